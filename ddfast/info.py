"""``python -m ddfast.info``: which backends are built and usable here, and why not the others."""

from __future__ import annotations

import platform


def report() -> str:
    import torch

    import ddfast
    from ddfast.dispatch import backends

    lines = [
        f"ddfast {ddfast.__version__}  torch {torch.__version__}  python {platform.python_version()}",
        f"torch threads: {torch.get_num_threads()}  CUDA available: {torch.cuda.is_available()}",
        "",
        f"{'backend':<10} {'usable':<7} note",
    ]
    for name, st in backends().items():
        lines.append(f"{name:<10} {'yes' if st['available'] else 'no':<7} {st['reason']}")
    from ddfast.ops.relu_max_pool2d import relu_max_pool2d_backends

    rmp = relu_max_pool2d_backends("cpu", torch.float32)
    lines += ["", f"relu_max_pool2d on CPU float32 tensors: backend='auto' takes {rmp.pop('auto')!r}"]
    lines += [f"  {name:<10} {'; '.join(why) if why else 'fits'}" for name, why in rmp.items()]
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
