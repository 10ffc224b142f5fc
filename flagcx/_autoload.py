"""torch's plugin hook: ``import torch`` imports flagcx, so ``backend="flagcx"`` needs no ``import flagcx``.

torch runs the ``torch.backends`` entry points near the end of its own import
(``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` turns that off). Importing this module imports the
flagcx package first, and the package's ``__init__`` registers the backend: under
torchrun a script that never imports flagcx works as it does under ``flagcx.launch``.
When the program imports flagcx before torch, torch gets here from inside flagcx's own
import (flagcx imports torch), and the package registers once its import completes.
"""


def load() -> None:
    """The entry point torch calls; registration already happened, or happens, in the package's import (see above)."""
