"""Model sources and configs, torch-free: both processes read them."""
