"""Hands CMake the Python and Torch to build fastvlm_kernels._C against; CMakeLists.txt owns the build.

Environment: FASTVLM_BUILD_CUDA=0|1 (default: 1 when torch is a CUDA build and nvcc is found),
TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"), MAX_JOBS (parallel compile jobs), CUDA_HOME.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _log(message: str) -> None:
    print(f"fastvlm_kernels: {message}", flush=True)


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return Path(cuda_home) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    return Path(found) if found else None


def _cuda_home(nvcc: Path) -> Path:
    """The toolkit behind `nvcc` (which may be a wrapper script elsewhere): the folder holding include/."""
    if os.environ.get("CUDA_HOME"):
        return Path(os.environ["CUDA_HOME"])
    if (nvcc.resolve().parent.parent / "include" / "cuda_runtime.h").exists():
        return nvcc.resolve().parent.parent
    dryrun = subprocess.run([str(nvcc), "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                            capture_output=True, text=True)
    for line in dryrun.stderr.splitlines() + dryrun.stdout.splitlines():
        if "TOP=" in line:
            return Path(line.split("TOP=", 1)[1].strip()).resolve()
    raise RuntimeError(f"cannot tell which CUDA toolkit {nvcc} belongs to: set CUDA_HOME")


def _nvidia_wheel_root():
    """site-packages/nvidia/cu13 (or cu12): headers and libraries that some toolkits lack."""
    try:
        import nvidia  # the namespace package torch's CUDA wheels install
    except ImportError:
        return None
    for base in nvidia.__path__:
        for name in ("cu13", "cu12"):
            if (Path(base) / name / "include").is_dir():
                return Path(base) / name
    return None


def _tool(name):
    """cmake / ninja: the registry packages' binaries first (the system cmake may be too old)."""
    try:
        module = __import__(name)
        directory = getattr(module, "CMAKE_BIN_DIR", None) or getattr(module, "BIN_DIR", None)
        if directory and (Path(directory) / name).exists():
            return str(Path(directory) / name)
    except ImportError:
        pass
    return shutil.which(name)


def _cuda_choice(torch):
    """(build_cuda, reason) from FASTVLM_BUILD_CUDA, the torch build and nvcc."""
    requested = os.environ.get("FASTVLM_BUILD_CUDA", "").strip()
    nvcc = _find_nvcc()
    if requested == "0":
        return False, "FASTVLM_BUILD_CUDA=0"
    if torch.version.cuda is None:
        if requested == "1":
            raise RuntimeError("FASTVLM_BUILD_CUDA=1 but torch is a CPU build: install a CUDA build of torch")
        return False, f"torch {torch.__version__} is a CPU build"
    if nvcc is None:
        if requested == "1":
            raise RuntimeError("FASTVLM_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return True, f"nvcc {nvcc}"


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch  # the torch of the environment we build in (see README: --no-build-isolation)

        module_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        output_dir = module_path.parent
        output_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)

        build_cuda, reason = _cuda_choice(torch)
        torch_root = Path(torch.__file__).resolve().parent
        args = [
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DFASTVLM_OUTPUT_DIR={output_dir}",
            f"-DFASTVLM_MODULE_NAME={module_path.name.removesuffix('.so')}",
            f"-DFASTVLM_TORCH_ROOT={torch_root}",
            f"-DFASTVLM_TORCH_VERSION={torch.__version__}",
            f"-DFASTVLM_TORCH_CUDA={torch.version.cuda or ''}",
            f"-DFASTVLM_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DFASTVLM_BUILD_CUDA={'ON' if build_cuda else 'OFF'}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        env = dict(os.environ)
        if build_cuda:
            cuda_home = _cuda_home(_find_nvcc())
            nvcc = cuda_home / "bin" / "nvcc"
            env.setdefault("CUDA_HOME", str(cuda_home))
            env.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}",
                     f"-DCUDAToolkit_ROOT={cuda_home}"]
            nvidia_root = _nvidia_wheel_root()
            if nvidia_root is not None:
                args.append(f"-DFASTVLM_NVIDIA_ROOT={nvidia_root}")
            _log(f"building the CPU and CUDA kernels ({reason}, TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']})")
        else:
            _log(f"building the CPU kernels only: {reason}")
        ninja = _tool("ninja")
        if ninja:
            args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        cmake = _tool("cmake")
        if cmake is None:
            raise RuntimeError("cmake >= 3.26 not found: pip install cmake ninja")
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)

        subprocess.run([cmake, str(ROOT), *args], cwd=build_dir, env=env, check=True)
        subprocess.run([cmake, "--build", ".", "--parallel", jobs], cwd=build_dir, env=env, check=True)
        info = json.loads((output_dir / "_build_info.json").read_text())
        _log(f"built {module_path} for torch {info['torch_version']} (CUDA kernels: {info['with_cuda']})")

    def copy_extensions_to_source(self):
        # In-place and editable builds copy the module into the source tree; its build record goes along.
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            record = Path(regular_file).parent / "_build_info.json"
            if record.exists():
                self.copy_file(str(record), str(Path(inplace_file).parent / record.name), level=self.verbose)


setup(
    ext_modules=[Extension("fastvlm_kernels._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
