"""One line naming the CPU a benchmark ran on, for results files: the model name,
its family and model numbers (cloud VMs often report only "AMD EPYC"), the
widest vector extension and the instruction set cdl dispatched to."""
import os
import platform


def describe():
    fields = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "flags") and key not in fields:
                    fields[key] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    flags = fields.get("flags", "").split()
    vec = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    try:
        from cdl._kernels import _dispatch
        isa = _dispatch.ISA
    except ImportError:
        isa = "?"
    return (f"{name}{', ' + vec if vec else ''}, {os.cpu_count()} cores, "
            f"cdl's {isa} kernels")
