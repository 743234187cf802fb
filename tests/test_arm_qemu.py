"""AArch64 kernels under qemu-aarch64, plus the same C++ harness built for the host.

Cross-builds tests/cpp/kernel_test.cc with every kernel source (cmake/aarch64-linux-gnu.cmake,
build dir build/aarch64, reused so rebuilds are incremental) and runs it under qemu with
  * the default CPU (has dotprod)    -> dispatch must pick neondot,
  * -cpu cortex-a76 (Pi 5's core)    -> neondot,
  * -cpu cortex-a53 (no dotprod)     -> neon, i.e. the fallback path; SDOT would SIGILL.
Each run checks ref / neon / neondot (whichever the emulated CPU supports) against the
reference for every qtype x group x shape (see the header of kernel_test.cc) and must end
with "<N> passed, 0 failed". The three runs are started together to save wall time.

The harness is also built natively (build/host-cpptest) and run, so it is exercised on x86
too (ref, plus avx2 / avxvnni when compiled and supported; on an x86 host with AVX-VNNI the
avxvnni kernels must be tested, and vpdpbusd may appear only in their code).

Missing cross tools (aarch64-linux-gnu-g++, qemu-aarch64) or cmake: skipped with a hint to
run `make setup` as root, unless EDGEVLM_REQUIRE_ARM=1, which turns the skip into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytestmark = pytest.mark.arm

ROOT = Path(__file__).resolve().parents[1]
ARM_BUILD = ROOT / "build" / "aarch64"
HOST_BUILD = ROOT / "build" / "host-cpptest"
TOOLCHAIN = ROOT / "cmake" / "aarch64-linux-gnu.cmake"
SYSROOT = "/usr/aarch64-linux-gnu"
BINARY = "evlm_kernel_test"
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$", re.M)
RUN_TIMEOUT_S = 600

# (qemu -cpu model or None for qemu's default, ISA that dispatch must choose)
QEMU_CPUS = [(None, "neondot"), ("cortex-a76", "neondot"), ("cortex-a53", "neon")]


def _require(tools: list[str], what: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    msg = (f"{what} needs {', '.join(missing)}: run `make setup` as root "
           "(it apt-installs the build tools, g++-aarch64-linux-gnu and qemu-user)")
    if os.environ.get("EDGEVLM_REQUIRE_ARM") == "1":
        pytest.fail(f"{msg} [EDGEVLM_REQUIRE_ARM=1]")
    pytest.skip(msg)


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _run(cmd: list, what: str, timeout: int = 1200) -> None:
    p = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode != 0:
        pytest.fail(f"{what} failed (exit {p.returncode}): {' '.join(map(str, cmd))}\n"
                    f"{_tail(p.stdout + p.stderr)}")


def _build(build_dir: Path, extra: list[str]) -> Path:
    """Configures (every time: cheap, and picks up new kernel files matched by the globs in
    cmake/sources.cmake) and builds the C++ test incrementally in build_dir."""
    gen = []
    if not (build_dir / "CMakeCache.txt").exists() and shutil.which("ninja"):
        gen = ["-G", "Ninja"]  # an existing build dir keeps its generator
    _run(["cmake", "-S", ROOT, "-B", build_dir, *gen, "-DCMAKE_BUILD_TYPE=Release",
          "-DEDGEVLM_PYTHON=OFF", "-DEDGEVLM_CPP_TESTS=ON", *extra], f"configure {build_dir.name}")
    _run(["cmake", "--build", build_dir, "--target", BINARY, "-j", str(os.cpu_count() or 2)],
         f"build {build_dir.name}")
    exe = build_dir / BINARY
    assert exe.exists(), f"{exe} was not produced"
    return exe


def _clean_env() -> dict:
    env = dict(os.environ)
    for var in ("EDGEVLM_ISA", "QEMU_CPU", "QEMU_LD_PREFIX"):  # would override dispatch / -cpu
        env.pop(var, None)
    return env


def _execute(cmd: list[str]) -> tuple[int, str, float]:
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_clean_env(),
                           timeout=RUN_TIMEOUT_S)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, out = -1, f"{out}\nTIMEOUT after {RUN_TIMEOUT_S} s"
    return rc, out, time.monotonic() - t0


def _check_summary(rc: int, out: str, label: str) -> int:
    m = SUMMARY.findall(out)
    assert m, f"{label}: no '<N> passed, <M> failed' line (exit {rc})\n{_tail(out)}"
    passed, failed = map(int, m[-1])
    assert rc == 0 and failed == 0 and passed > 0, \
        f"{label}: exit {rc}, {passed} passed, {failed} failed\n{_tail(out)}"
    return passed


@pytest.fixture(scope="module")
def arm_exe() -> Path:
    _require(["cmake", "aarch64-linux-gnu-g++", "qemu-aarch64"], "the aarch64 kernel test")
    return _build(ARM_BUILD, [f"-DCMAKE_TOOLCHAIN_FILE={TOOLCHAIN}"])


@pytest.fixture(scope="module")
def qemu_runs(arm_exe) -> dict:
    exe = arm_exe
    cmds = {}
    for cpu, isa in QEMU_CPUS:
        cpu_args = ["-cpu", cpu] if cpu else []
        cmds[cpu] = ["qemu-aarch64", *cpu_args, "-L", SYSROOT, str(exe), "--expect-isa", isa]
    with ThreadPoolExecutor(max_workers=len(cmds)) as pool:
        futures = {cpu: pool.submit(_execute, cmd) for cpu, cmd in cmds.items()}
        return {cpu: f.result() for cpu, f in futures.items()}


@pytest.mark.parametrize("cpu,isa", QEMU_CPUS, ids=[c or "default" for c, _ in QEMU_CPUS])
def test_kernels_under_qemu(qemu_runs, cpu, isa):
    rc, out, secs = qemu_runs[cpu]
    label = f"qemu-aarch64 -cpu {cpu or '(default)'} ({secs:.0f} s)"
    _check_summary(rc, out, label)
    assert f"default ISA: {isa}" in out, f"{label}: dispatch did not pick {isa}\n{_tail(out)}"
    tested = re.search(r"^ISAs tested:(.*)$", out, re.M)
    assert tested and {"ref", "neon"} <= set(tested.group(1).split()), _tail(out)
    if isa == "neondot":
        assert "neondot" in tested.group(1).split(), f"{label}: neondot not tested\n{_tail(out)}"
    else:  # the no-dotprod CPU must skip neondot for the right reason
        assert "neondot: CPU has no dotprod" in out, f"{label}\n{_tail(out)}"


def test_cpp_harness_on_host():
    cxx = os.environ.get("CXX") or ("c++" if shutil.which("c++") else "g++")
    _require(["cmake", cxx], "the host build of the C++ kernel test")
    exe = _build(HOST_BUILD, [])
    rc, out, secs = _execute([str(exe)])
    _check_summary(rc, out, f"host {BINARY} ({secs:.0f} s)")
    assert re.search(r"^ISAs tested: ref\b", out, re.M), _tail(out)
    tested = re.search(r"^ISAs tested:(.*)$", out, re.M).group(1).split()
    if re.search(r"^arch: x86-64  avx2=1 fma=1 f16c=1 avx_vnni=1$", out, re.M):
        assert "avxvnni" in tested or "avxvnni: not compiled into this build" in out, _tail(out)
    elif "avxvnni" not in tested and "arch: x86-64" in out:  # no AVX-VNNI: skipped, with the reason
        assert re.search(r"^  avxvnni: (CPU lacks AVX-VNNI|not compiled)", out, re.M), _tail(out)


def test_vnni_instructions_only_in_avxvnni_kernels():
    """avxvnni/*.cc is compiled with -mavxvnni and shares its code with avx2/*.cc (the same
    headers in another namespace). No vpdpbusd may reach any other function, or an AVX2-only
    CPU would SIGILL outside the avxvnni dispatch entry. Checked on the host C++ harness,
    built without LTO, so every function keeps its (demangled) symbol."""
    objdump = shutil.which("objdump")
    exe = HOST_BUILD / BINARY
    if objdump is None or not exe.exists():
        pytest.skip("needs objdump and the host harness (test_cpp_harness_on_host builds it)")
    out = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", str(exe)], capture_output=True, text=True,
                         check=True).stdout
    counts: dict[str, int] = {}
    fn = "?"
    for line in out.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            fn = head.group(1)
        elif "vpdpbusd" in line:
            counts[fn] = counts.get(fn, 0) + 1
    if not counts:
        pytest.skip("no AVX-VNNI code in this build (compiler without -mavxvnni, or not x86-64)")
    stray = {f: c for f, c in counts.items() if "avxvnni" not in f and "avx512vnni" not in f}
    assert not stray, f"vpdpbusd outside the avxvnni kernels: {stray}"


def test_neondot_objects_define_no_shared_inline_code(arm_exe):
    """neondot/*.cc is compiled with +dotprod. A weak (inline / template) symbol it emits
    could be merged by the linker into baseline callers and SIGILL on a Cortex-A53, so its
    objects may define only strong symbols (neon_impl.h keeps everything internal)."""
    nm = shutil.which("aarch64-linux-gnu-nm")
    if nm is None:
        pytest.skip("aarch64-linux-gnu-nm (binutils-aarch64-linux-gnu) not found")
    objs = sorted(ARM_BUILD.glob("**/csrc/kernels/neondot/*.o"))
    assert objs, f"no neondot objects under {ARM_BUILD}"
    for obj in objs:
        out = subprocess.run([nm, "-C", str(obj)], capture_output=True, text=True, check=True).stdout
        weak = [ln for ln in out.splitlines() if re.match(r"^\S*\s+[VvWwu]\s", ln)]
        assert not weak, f"{obj.name} defines weak symbols:\n" + "\n".join(weak[:20])
