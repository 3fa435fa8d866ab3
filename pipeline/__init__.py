"""Dataset-wide CNN visualization pipeline."""

import matplotlib

__version__ = "0.1.0"

# File, class and layer names reach figure titles: draw them literally, never as math
# ('$x$', '^', '_{' in a file name must not crash a sheet or change its text).
matplotlib.rcParams["text.parse_math"] = False
