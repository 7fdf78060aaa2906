"""The console script: Ctrl-C while the package is still being imported is one line and exit 130."""

import signal
import subprocess
import sys
import time


def test_ctrl_c_during_the_import_is_one_line_and_130(tmp_path):
    command = [sys.executable, "-c", "import sys, maestro_lod_entry; sys.exit(maestro_lod_entry.main())",
               "train", "--out", str(tmp_path / "run")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)  # past the interpreter's start, inside the import of torch (a second or more)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("maestro-lod: interrupted"), err
    assert not (tmp_path / "run").exists()
