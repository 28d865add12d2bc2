"""Weight-only quantized and prepacked matmuls for the CPU: one method object per linear layer (and
the lm_head), chosen once at start by measurement and installed after the weights load.

- int4_pack.py: 4-bit weights, groups of 32 along K (the GGUF's own Q4_0/Q4_1 blocks exactly).
- int8_pack.py: int8 weights, one scale per output channel.
- prepack.py:   dense weights reordered for oneDNN, used only where bit-identical and faster.
- methods.py:   the per-call dispatch: few rows -> quantized kernel, many rows -> dense matmul.
- choose.py:    the start-up measurement (threshold in rows) on the model's own matrices.
- install.py:   `--quantization` resolved, methods built and installed, the choice logged.
"""

from nlcli.engine.layers.quantization.install import QuantPlan, install_linear_methods
from nlcli.engine.layers.quantization.install import reinstall as reinstall_linear_methods

__all__ = ["QuantPlan", "install_linear_methods", "reinstall_linear_methods"]
