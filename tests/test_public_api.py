import subprocess
import sys

import lightning_curvprobe
import lightning_curvprobe.functional as F


def test_all_public_names_import():
    for name in lightning_curvprobe.__all__:
        assert hasattr(lightning_curvprobe, name), name
    for name in F.__all__:
        assert hasattr(F, name), name
    assert F.__all__ == sorted(F.__all__)


def test_functional_core_does_not_import_lightning():
    code = (
        "import sys, lightning_curvprobe.functional as F; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'torchmetrics')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    # import only the functional subpackage without the top-level package's Lightning imports
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
