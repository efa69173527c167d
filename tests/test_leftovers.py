"""The test run's check that it leaves nothing in the temporary folder (tests/conftest.py) can
fail: a run of a test that leaves a folder of ours and a Chromium one there passes the test and
fails the run, naming both, and takes them away."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LEAKY = '''
import os
import tempfile


def test_that_leaves_things_behind():
    tempfile.mkdtemp(prefix="hydraserve-cluster-")
    # the folder of the singleton socket Debian's Chromium leaves without a --user-data-dir
    os.mkdir(os.path.join(tempfile.gettempdir(), "org.chromium.Chromium.abc123"))
'''


def test_a_run_that_leaves_folders_in_the_temporary_folder_fails(tmp_path):
    root = Path(__file__).resolve().parent.parent
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_leaky.py").write_text(LEAKY)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), str(tmp_path / "test_leaky.py")],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 passed, 1 error" in out.stdout, out.stdout
    assert re.search(r"left 2 folder\(s\) or file\(s\) in the temporary folder: "
                     r"hydraserve-cluster-\w+, org\.chromium\.Chromium\.abc123",
                     out.stdout), out.stdout
    # the inner run's temporary folder was made in ours (TMPDIR) and is gone with what it held
    assert not [n for n in os.listdir(tempfile.gettempdir()) if n.startswith("hydraserve-")]
