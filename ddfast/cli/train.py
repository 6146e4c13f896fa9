"""Models the distillers read: ``ddfast trajectory`` (SGD trajectories) and ``ddfast ssl`` (the KRR-ST target).

Both write run folders under the one policy of :class:`ddfast.runs.RunFolder` (lock, manifest,
``--resume`` / ``--overwrite``)."""

from __future__ import annotations

import os

from ddfast.cli._common import (UsageError, add_distributed, add_progress, add_run_options, model_names,
                                nonneg_float, nonneg_int, positive_float, positive_int, unit_interval)


def add_parsers(sub) -> None:
    tr = sub.add_parser("trajectory", help="train on the real set with SGD and store the trajectory {(θ_t, η_t)}")
    tr.add_argument("--dataset", default="digits", help="data set whose training split is trained on")
    tr.add_argument("--root", default=None, help="folder with the data set's files")
    tr.add_argument("--arch", default="convnet", choices=model_names(), help="network")
    tr.add_argument("--width", type=positive_int, default=None,
                    help="convnet: channels of every block; resnet/vgg: first-stage width; mlp: both hidden layers")
    tr.add_argument("--norm", default=None, choices=["batch", "instance", "none"], help="convnet / vgg11 normalisation")
    tr.add_argument("--epochs", type=positive_int, required=True, help="passes over the training set")
    tr.add_argument("--every", type=positive_int, required=True, metavar="K", help="SGD steps between checkpoints")
    tr.add_argument("--lr", type=positive_float, default=0.01, help="SGD learning rate η")
    tr.add_argument("--momentum", type=unit_interval, default=0.0, help="SGD momentum")
    tr.add_argument("--weight-decay", type=nonneg_float, default=0.0, help="SGD weight decay")
    tr.add_argument("--schedule", default="constant", choices=["constant", "step", "cosine"], help="η schedule")
    tr.add_argument("--milestones", type=positive_int, nargs="+", default=None,
                    help="step schedule: epochs where η *= gamma")
    tr.add_argument("--gamma", type=positive_float, default=0.1, help="step schedule: decay factor")
    tr.add_argument("--batch-size", type=positive_int, default=256, help="examples per SGD step")
    tr.add_argument("--seed", type=nonneg_int, default=0, help="seed of the initialisation and the data order")
    tr.add_argument("--out", required=True, help="trajectory folder (checkpoints, trajectory.json, manifest)")
    add_run_options(tr, "trajectory")
    add_progress(tr)
    add_distributed(tr)
    tr.set_defaults(handler=trajectory)

    ssl = sub.add_parser("ssl", help="train the self-supervised (Barlow Twins) target model of KRR-ST")
    ssl.add_argument("--dataset", default="mnist", help="unlabeled source data set (its training split)")
    ssl.add_argument("--root", default=None, help="folder with the data set's files")
    ssl.add_argument("--image-size", type=positive_int, default=None,
                     help="resize the images to this size (default: the size `ddfast distill krr-st` uses for the "
                          "data set, e.g. 16 for digits, 28 for MNIST)")
    ssl.add_argument("--arch", default="convnet", choices=["convnet", "resnet18"], help="encoder")
    ssl.add_argument("--widths", type=positive_int, nargs="+", default=None,
                     help="ConvNet block widths (default 32 64 128)")
    ssl.add_argument("--width", type=positive_int, default=64, help="ResNet-18 first-stage width (64: paper, 512-d)")
    ssl.add_argument("--epochs", type=positive_int, default=None,
                     help="passes over the training images (default: CPU preset)")
    ssl.add_argument("--batch-size", type=positive_int, default=256, help="images per step")
    ssl.add_argument("--lr", type=positive_float, default=None, help="AdamW peak learning rate")
    ssl.add_argument("--weight-decay", type=nonneg_float, default=None, help="AdamW weight decay")
    ssl.add_argument("--projector", type=positive_int, nargs="+", default=None,
                     help="projector widths (default 512 512 512; paper: 8192 8192 8192)")
    ssl.add_argument("--lambda-offdiag", type=nonneg_float, default=5.1e-3, help="weight of the off-diagonal term")
    ssl.add_argument("--max-train", type=positive_int, default=None, help="train on a random subset of this many images")
    ssl.add_argument("--seed", type=nonneg_int, default=0, help="seed of the initialisation, views and order")
    ssl.add_argument("--out", required=True, help="folder for the checkpoint, target.safetensors and the manifest")
    add_run_options(ssl, "training")
    ssl.add_argument("--no-resume", dest="overwrite", action="store_true",
                     help="the same as --overwrite (kept for older scripts)")
    add_progress(ssl)
    ssl.set_defaults(handler=ssl_train)


def _model_options(args, image_size: int) -> dict:
    from ddfast.models.convnet import convnet_depth

    options = {}
    if args.width is not None:
        if args.arch == "convnet":
            options["widths"] = [args.width] * convnet_depth(image_size)
        elif args.arch in ("resnet18", "resnet10", "vgg11"):
            options["width"] = args.width
        elif args.arch == "mlp":
            options["hidden"] = [args.width, args.width]
        else:
            raise UsageError(f"trajectory: --width does not apply to --arch {args.arch}")
    if args.norm is not None:
        if args.arch not in ("convnet", "vgg11"):
            raise UsageError(f"trajectory: --norm applies to convnet and vgg11, not --arch {args.arch}")
        options["norm"] = args.norm
    return options


def trajectory(args) -> int:
    from ddfast.data import load_dataset
    from ddfast.distributed import DistContext
    from ddfast.runs import dataset_identity, dataset_spec, maybe_run_folder
    from ddfast.trajectory import INDEX_FILE, RESUME_FILE, train_trajectory

    group = getattr(args, "process_group", None)
    with maybe_run_folder(args.out, "trajectory", enabled=DistContext(group).is_main, command="ddfast trajectory",
                          owned=(INDEX_FILE, RESUME_FILE, "ckpt-*.safetensors")) as run:
        if args.norm is not None or args.width is not None:
            _model_options(args, 32)  # option errors before the data set is loaded
        data = load_dataset(args.dataset, args.root)
        options = _model_options(args, data.image_size)
        config = {k: getattr(args, k) for k in ("arch", "epochs", "every", "lr", "momentum", "weight_decay", "schedule",
                                                "milestones", "gamma", "batch_size", "seed")}
        spec, root = dataset_spec(args.dataset, args.root)
        resume = args.resume
        if run is not None:
            resume = run.begin({**config, "dataset": spec, "root": root, "model_options": options},
                               inputs={"data": dataset_identity(data, args.dataset, args.root)},
                               resume=args.resume, overwrite=args.overwrite)
        resume = DistContext(group).broadcast_object(resume) if group is not None else resume
        traj = train_trajectory(data, args.arch, args.out, epochs=args.epochs, every=args.every, lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                                milestones=args.milestones, gamma=args.gamma, batch_size=args.batch_size,
                                seed=args.seed, model_options=options, resume=resume, progress=not args.no_progress,
                                process_group=group)
        if run is not None:
            files = {INDEX_FILE: {"values": {"complete": [True]}}}
            files.update({name: {"tensors": {"*": ["finite"]}} for name in sorted(os.listdir(args.out))
                          if name.startswith("ckpt-") and name.endswith(".safetensors")})
            run.finish(files)
    loss, acc = traj.index.get("final_train_loss"), traj.test_accuracy
    print(f"{args.out}: {len(traj)} checkpoints of {traj.arch} on {traj.index['dataset']} over {traj.steps[-1]} SGD steps, "
          f"final train loss {'n/a' if loss is None else f'{loss:.4f}'}, "
          f"test accuracy {'n/a' if acc is None else f'{acc:.2f}%'}")
    print(f"{args.out}: trajectory.json + ckpt-*.safetensors")
    return 0


def ssl_train(args) -> int:
    from ddfast.data import load_dataset
    from ddfast.runs import dataset_identity, dataset_spec, maybe_run_folder
    from ddfast.ssl import train_barlow_twins
    from ddfast.ssl.barlow_twins import CHECKPOINT_FILE, TARGET_FILE

    from ddfast.experiments.krr_st import PRESETS

    if args.image_size is None and args.dataset in PRESETS:  # the resolution `ddfast distill krr-st` uses
        args.image_size = PRESETS[args.dataset]["image_size"]
    with maybe_run_folder(args.out, "ssl", command="ddfast ssl", owned=(TARGET_FILE, CHECKPOINT_FILE)) as run:
        data = load_dataset(args.dataset, args.root, image_size=args.image_size)
        presets = {k: getattr(args, k) for k in ("epochs", "lr", "weight_decay", "projector")
                   if getattr(args, k) is not None}
        spec, root = dataset_spec(args.dataset, args.root)
        config = {k: getattr(args, k) for k in ("image_size", "arch", "widths", "width", "epochs", "batch_size", "lr",
                                                "weight_decay", "projector", "lambda_offdiag", "max_train", "seed")}
        resume = run.begin({**config, "dataset": spec, "root": root},
                           inputs={"data": dataset_identity(data, args.dataset, args.root)},
                           resume=args.resume, overwrite=args.overwrite, growable=("epochs",))
        target = train_barlow_twins(
            data, arch=args.arch, widths=args.widths, width=args.width, batch_size=args.batch_size,
            lambda_offdiag=args.lambda_offdiag, seed=args.seed, out=args.out, resume=resume,
            progress=not args.no_progress, max_train=args.max_train, **presets,
        )
        run.finish({TARGET_FILE: {"tensors": {"*": ["finite"]}}})
    meta = target.meta
    print(f"{args.out}: Barlow Twins {meta['arch']} on {meta['dataset']} ({meta['train_examples']} images), "
          f"{meta['epochs']} epochs, final loss {meta['final_loss']:.2f}, {target.out_dim}-d representation")
    print(f"target model: {os.path.join(args.out, TARGET_FILE)}")
    return 0
