"""``python -m ddfast.info``: which backends are built and usable here, why not the others, and what
``backend="auto"`` takes per op (read from the registry in :mod:`ddfast.dispatch`)."""

from __future__ import annotations

import platform


def report() -> str:
    import torch

    import ddfast
    from ddfast import dispatch

    ext, why = dispatch._load_extension()
    built = ext.build_info() if ext is not None else {}
    lines = [
        f"ddfast {ddfast.__version__}  torch {torch.__version__}  python {platform.python_version()}",
        f"ddfast._C: " + (f"built against torch {built.get('torch_version')}"
                          + (f", CUDA {built['cuda_version']}" if built.get("cuda_version") else ", CPU only")
                          if ext is not None else why),
        f"torch threads: {torch.get_num_threads()}  CUDA available: {torch.cuda.is_available()}",
        "",
        f"{'backend':<10} {'usable':<7} note",
    ]
    for name, st in dispatch.backends().items():
        lines.append(f"{name:<10} {'yes' if st['available'] else 'no':<7} {st['reason']}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        lines += ["", f"ops on {device} float32 tensors (size limits apply per call; see ddfast.ops.explain):"]
        for op, per_backend in dispatch.backend_status(device, torch.float32).items():
            fits = [b for b, reasons in per_backend.items() if not reasons]
            auto = next((b for b in fits if not (b == "triton" and device == "cpu")), "none")
            lines.append(f"  {op:<16} auto -> {auto:<10} usable: {', '.join(fits) or 'none'}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
