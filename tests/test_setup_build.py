"""setup.py's decisions, run against a stand-in torch so they are checked on any machine: the torch
range, the toolkit found behind a wrapper nvcc, and the C++ standard left to torch."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_CPP_EXTENSION = '''
class _Ext:
    def __init__(self, name, sources, **kw):
        self.name, self.sources, self.kw = name, sources, kw
class CppExtension(_Ext):
    pass
class CUDAExtension(_Ext):
    pass
class BuildExtension:
    @classmethod
    def with_options(cls, **kw):
        return cls
'''


def _fake_torch(tmp_path, version, cuda):
    pkg = tmp_path / "faketorch" / "torch"
    (pkg / "utils").mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(f"""
        __version__ = {version!r}
        class version:
            cuda = {cuda!r}
        class cuda:
            @staticmethod
            def is_available():
                return False
        """))
    (pkg / "utils" / "__init__.py").write_text("")
    # record what setup.py hands to the extension classes, so the test can read the flags
    (pkg / "utils" / "cpp_extension.py").write_text(FAKE_CPP_EXTENSION + textwrap.dedent("""
        import atexit, json, os, sys
        _made = []
        _orig = _Ext.__init__
        def _init(self, name, sources, **kw):
            _orig(self, name, sources, **kw)
            _made.append({"cls": type(self).__name__, "args": kw.get("extra_compile_args")})
        _Ext.__init__ = _init
        atexit.register(lambda: print("EXT " + json.dumps(_made), file=sys.stderr))
        """))
    return tmp_path / "faketorch"


def _run_setup(tmp_path, version, cuda, env_extra=None, path_prefix=None):
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_HOME", "CUDA_PATH", "FORCE_CUDA", "TORCH_CUDA_ARCH_LIST",
                        "RTDETR_FAST_NO_EXT")}
    env["PYTHONPATH"] = str(_fake_torch(tmp_path, version, cuda))
    if path_prefix:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_torch_older_than_supported_is_one_clear_error(tmp_path):
    r = _run_setup(tmp_path, "2.10.1+cpu", None)
    assert r.returncode != 0
    assert "needs torch >= 2.11" in r.stderr and "torch 2.10.1+cpu" in r.stderr
    assert "RTDETR_FAST_NO_EXT=1" in r.stderr


def test_oldest_supported_torch_builds(tmp_path):
    # the GPU image's torch (2.11, C++17 extensions): accepted, standard left to torch
    r = _run_setup(tmp_path, "2.11.0+cpu", None)
    assert r.returncode == 0, r.stderr
    assert "building the CPU extension" in r.stderr


def test_cpu_build_leaves_the_cxx_standard_to_torch(tmp_path):
    r = _run_setup(tmp_path, "2.14.1+cpu", None)
    assert r.returncode == 0, r.stderr
    assert "building the CPU extension" in r.stderr
    ext_line = [ln for ln in r.stderr.splitlines() if ln.startswith("EXT ")][-1]
    assert '"CppExtension"' in ext_line
    assert "-std=" not in ext_line


def test_no_ext_skips_the_extension(tmp_path):
    r = _run_setup(tmp_path, "2.13.0+cpu", None, {"RTDETR_FAST_NO_EXT": "1"})
    assert r.returncode == 0, r.stderr
    assert "skipping the native extension" in r.stderr


def test_force_cuda_with_cpu_torch_is_one_clear_error(tmp_path):
    r = _run_setup(tmp_path, "2.13.0+cpu", None, {"FORCE_CUDA": "1"})
    assert r.returncode != 0
    assert "FORCE_CUDA=1 needs a CUDA build of torch" in r.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_wrapper_nvcc_finds_the_real_toolkit(tmp_path):
    # a wrapper script outside the toolkit, as some images install: the folder above it has no
    # CUDA headers, and torch's own guess (dirname(dirname(nvcc))) would pick that folder
    real = shutil.which("nvcc")
    wrap_dir = tmp_path / "wrapbin"
    wrap_dir.mkdir()
    wrapper = wrap_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    r = _run_setup(tmp_path, "2.15.0+cu130", "13.0",
                   {"FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "8.0;9.0"}, path_prefix=wrap_dir)
    assert r.returncode == 0, r.stderr
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("rtdetr_fast: torch ")][0]
    home = line.split("CUDA_HOME=")[1].split(" ")[0]
    assert Path(home, "bin", "nvcc").exists()
    assert home != str(tmp_path)
    assert f"nvcc -dryrun of {wrapper}" in line
    ext_line = [ln for ln in r.stderr.splitlines() if ln.startswith("EXT ")][-1]
    assert '"CUDAExtension"' in ext_line and "-std=" not in ext_line
