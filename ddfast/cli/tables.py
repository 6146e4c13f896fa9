"""Result tables: ``ld-table``, ``krr-st-table``, ``ead-table``, ``softlabel-table``, ``dcs``, ``e2e-parity``."""

from __future__ import annotations

import os

from ddfast.cli._common import (BACKENDS, UsageError, add_progress, model_names, nonneg_int, positive_float,
                                positive_int, unit_interval)


def add_parsers(sub) -> None:
    from ddfast.cli.distill import add_ld_options

    table = sub.add_parser("ld-table", help="LD / LD-RR vs the true-label and label-smoothing baselines")
    add_ld_options(table, single=False)
    table.add_argument("--models", type=positive_int, default=10, help="fresh models per cell")
    table.add_argument("--out", default="runs", help="folder for the runs (resumed when re-run) and the table JSON")
    table.set_defaults(handler=ld_table)

    kt = sub.add_parser("krr-st-table", help="KRR-ST transfer (and data-free KD) table against w/o pre, Random, K-means")
    kt.add_argument("run", help="a finished KRR-ST run folder")
    kt.add_argument("--targets", nargs="+", default=None, help="labelled target data sets (default: per source)")
    kt.add_argument("--runs", type=positive_int, default=3, help="pre-train + fine-tune runs per cell")
    kt.add_argument("--arch", default=None, choices=model_names(),
                    help="network pre-trained and fine-tuned (default: convnet)")
    kt.add_argument("--widths", type=positive_int, nargs="+", default=None, help="ConvNet channels per block")
    kt.add_argument("--protocol", default=None, choices=["finetune", "linear"],
                    help="finetune (paper tables) or linear (frozen trunk + linear head, the method's meta-test)")
    kt.add_argument("--linear-steps", type=positive_int, default=None, help="steps of the linear head (protocol linear)")
    kt.add_argument("--pretrain-epochs", type=positive_int, default=None, help="pre-training epochs on each set")
    kt.add_argument("--finetune-steps", type=positive_int, default=None, help="fine-tuning steps on each target")
    kt.add_argument("--target-train-size", type=positive_int, default=None,
                    help="labelled target examples used for fine-tuning")
    kt.add_argument("--kd", default=None, metavar="TARGET", help="also the data-free KD table on this target")
    kt.add_argument("--kd-epochs", type=positive_int, default=None, help="student epochs on the surrogate images")
    kt.add_argument("--teacher-steps", type=positive_int, default=None, help="training steps of the KD teacher")
    kt.add_argument("--kd-only", action="store_true", help="only the data-free KD table (needs --kd)")
    kt.add_argument("--rows", nargs="+", default=None, choices=["wo-pre", "random", "kmeans", "random-g", "krr-st"],
                    help="transfer rows to run (default: all); e.g. an ablation run needs only krr-st")
    kt.add_argument("--json", default=None, help="write the results here")
    add_progress(kt)
    kt.set_defaults(handler=krr_st_table)

    et = sub.add_parser("ead-table", help="EAD vs random real subsets (hard / soft labels) at several IPC")
    et.add_argument("--dataset", default="digits", help="real data set")
    et.add_argument("--root", default=None, help="folder with the data set's files")
    et.add_argument("--ipc", type=positive_int, nargs="+", default=[1, 10], help="images per class, one column each")
    et.add_argument("--objectives", nargs="+", default=["normalised", "printed"], choices=["normalised", "printed"],
                    help="EAD objectives, one row each")
    et.add_argument("--models", type=positive_int, default=5, help="fresh models per cell")
    et.add_argument("--iterations", type=positive_int, default=None, help="EAD iterations (default: the preset)")
    et.add_argument("--t-m", dest="t_m", type=positive_int, nargs="+", default=None,
                    help="checkpoints sampled per iteration (several values: candidates, needs --select)")
    et.add_argument("--lr", type=positive_float, nargs="+", default=None,
                    help="learning rate of images and labels (default: the preset; several values: candidates, "
                         "needs --select)")
    et.add_argument("--select", action="store_true",
                    help="choose among --objectives x --lr x --t-m on the validation split, then test the chosen "
                         "setting once (one EAD row; the choice and every validation score go to the JSON)")
    et.add_argument("--trajectory-momentum", type=unit_interval, default=None,
                    help="SGD momentum of the trajectory (default: 0, plain SGD as EAD's derivation assumes)")
    et.add_argument("--backend", default="auto", choices=BACKENDS, help="op backend")
    et.add_argument("--seed", type=nonneg_int, default=0, help="seed of the subsets, runs and models")
    et.add_argument("--out", default="runs", help="folder for the trajectory, the runs and the table JSON")
    add_progress(et)
    et.set_defaults(handler=ead_table)

    from ddfast.experiments.softlabel import REGIMES as SL_REGIMES, SETS as SL_SETS

    sl = sub.add_parser("softlabel-table", help="coresets vs distilled sets (DM, DC, TM, DATM, SRe2L, DWA) under "
                                                "hard labels, soft labels and soft labels + KD")
    sl.add_argument("--dataset", default="digits", help="real data set")
    sl.add_argument("--root", default=None, help="folder with the data set's files")
    sl.add_argument("--ipc", type=positive_int, nargs="+", default=[10, 50], help="images per class, one column each")
    sl.add_argument("--sets", nargs="+", default=list(SL_SETS), choices=list(SL_SETS),
                    help="sets compared, one row each (default: all)")
    sl.add_argument("--regimes", nargs="+", default=list(SL_REGIMES), choices=list(SL_REGIMES),
                    help="evaluation regimes, one column group each: hl (hard labels), sl (fixed teacher soft "
                         "labels), sl+kd (the teacher relabels every augmented view)")
    sl.add_argument("--iterations", type=positive_int, default=None,
                    help="iterations of every distiller (default: each one's CPU preset)")
    sl.add_argument("--models", type=positive_int, default=5, help="fresh models per cell")
    sl.add_argument("--budget", type=positive_int, default=None, help="training epochs per model (default 300)")
    sl.add_argument("--seed", type=nonneg_int, default=0, help="seed of the sets and models")
    sl.add_argument("--out", default="runs/softlabel", help="folder for the sets, the teacher and the table")
    add_progress(sl)
    sl.set_defaults(handler=softlabel_table)

    dp = sub.add_parser("dcs", help="distillation correlation score of DM / TM losses over coreset subsets")
    dp.add_argument("--dataset", default="digits", help="real data set")
    dp.add_argument("--root", default=None, help="folder with the data set's files")
    dp.add_argument("--loss", nargs="+", default=["dm", "tm"], choices=["dm", "tm"], help="losses scored")
    dp.add_argument("--ipc", type=positive_int, nargs="+", default=[5, 10, 20], help="subset sizes per class")
    dp.add_argument("--seeds", type=nonneg_int, nargs="+", default=[0, 1], help="subset seeds")
    dp.add_argument("--models", type=positive_int, default=2, help="HL models per subset")
    dp.add_argument("--budget", type=positive_int, default=100, help="HL training epochs per model")
    dp.add_argument("--repeats", type=positive_int, default=3,
                    help="random networks (DM) / start checkpoints (TM) per loss")
    dp.add_argument("--out", default="runs/dcs", help="folder for the results and the scatter plots")
    add_progress(dp)
    dp.set_defaults(handler=dcs)

    from ddfast.benchmarks.e2e import MODES as E2E_MODES
    from ddfast.experiments.e2e_parity import STUDIES as PARITY_STUDIES

    par = sub.add_parser("e2e-parity", help="accuracy of short distillations in each network-pass mode")
    par.add_argument("--out", required=True, help="folder for the runs and parity.json (re-running skips finished rows)")
    par.add_argument("--studies", nargs="+", default=list(PARITY_STUDIES), choices=PARITY_STUDIES, help="studies run")
    par.add_argument("--modes", nargs="+", default=list(E2E_MODES), choices=E2E_MODES, help="network-pass modes")
    par.add_argument("--target", default=None, help="KRR-ST target model folder (ddfast ssl)")
    par.add_argument("--ld-epochs-digits", type=positive_int, default=300, help="LD epochs on digits")
    par.add_argument("--ld-epochs-mnist", type=positive_int, default=5, help="LD epochs on MNIST")
    par.add_argument("--krr-steps", type=positive_int, default=300, help="KRR-ST meta-steps")
    par.add_argument("--seed", type=nonneg_int, default=0, help="seed of every run")
    par.set_defaults(handler=e2e_parity)


# ------------------------------------------------------------------------------------------ handlers


def ld_table(args) -> int:
    from ddfast.experiments.ld import format_table, ld_table as run_table

    overrides = dict(model=args.model, epochs=args.epochs, outer_batch=args.outer_batch, val_every=args.val_every)
    rows = run_table(args.dataset, args.base_examples, models=args.models, seed=args.seed, backend=args.backend,
                     out=args.out, root=args.root, progress=not args.no_progress, **overrides)
    print()
    print(f"{args.dataset}: test accuracy (%), mean ± std over {args.models} fresh models")
    print(format_table(rows, args.base_examples))
    return 0


def krr_st_table(args) -> int:
    from ddfast.evaluate.transfer import TransferSettings, format_transfer_table
    from ddfast.experiments.krr_st import kd_table, transfer

    if args.kd_only and not args.kd:
        raise UsageError("krr-st-table: --kd-only needs --kd TARGET")
    settings = TransferSettings()
    for name in ("arch", "protocol", "pretrain_epochs", "finetune_steps", "target_train_size", "linear_steps",
                 "kd_epochs", "teacher_steps"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    if args.widths:
        settings.widths = tuple(args.widths)
    results, kd = {}, None
    if not args.kd_only:
        results = transfer(args.run, args.targets, runs=args.runs, settings=settings, progress=not args.no_progress,
                           rows=args.rows)
        print()
        print(f"{args.run}: transfer test accuracy (%), {settings.protocol}, {settings.arch}, mean ± std over {args.runs} runs")
        print(format_transfer_table(results))
    if args.kd:
        kd = kd_table(args.run, args.kd, runs=args.runs, settings=settings, progress=not args.no_progress)
        print()
        print(f"{args.run}: target data-free KD on {args.kd} (%), mean ± std over {args.runs} runs")
        print(format_transfer_table(kd))
    if args.json:
        from ddfast.artifacts import write_json_atomic

        write_json_atomic(args.json, {"transfer": results, "arch": settings.arch, "protocol": settings.protocol,
                                      **({"kd": kd} if args.kd else {})})
    return 0


def ead_table(args) -> int:
    from ddfast.artifacts import write_json_atomic
    from ddfast.experiments.ead import ead_table as run_table, format_table

    t_m, lr = args.t_m or [], args.lr or []
    select = None
    if args.select:
        select = {"objective": list(dict.fromkeys(args.objectives))}
        if t_m:
            select["t_m"] = list(dict.fromkeys(t_m))
        if lr:
            select["lr"] = list(dict.fromkeys(lr))
        overrides = dict(iterations=args.iterations, backend=args.backend)
    else:
        if len(t_m) > 1 or len(lr) > 1:
            raise UsageError("ead-table: several --t-m / --lr values are candidates; add --select to choose on validation")
        overrides = dict(iterations=args.iterations, t_m=t_m[0] if t_m else None, backend=args.backend,
                         lr_images=lr[0] if lr else None, lr_labels=lr[0] if lr else None)
    rows = run_table(args.dataset, tuple(args.ipc), out=args.out, models=args.models, seed=args.seed,
                     objectives=tuple(args.objectives), progress=not args.no_progress, root=args.root, select=select,
                     trajectory_momentum=args.trajectory_momentum, **overrides)
    print(format_table(rows, args.ipc, title=f"EAD on {args.dataset}: test accuracy (%) of {args.models} fresh models"))
    for r in rows:
        for i, sel in r.selection.items():
            vals = ", ".join(f"{c['candidate']}: {c['mean']:.2f}" for c in sel["val"])
            print(f"IPC {i}: chosen on validation {sel['chosen']} (validation accuracy {vals})")
    path = os.path.join(args.out, f"ead-table-{args.dataset}{'-selected' if select else ''}.json")
    write_json_atomic(path, {r.name: {str(i): ({"accuracies": r.results[i].accuracies, "selection": r.selection[i]}
                                               if i in r.selection else r.results[i].accuracies)
                                      for i in r.results} for r in rows})
    print(f"results: {path}")
    return 0


def softlabel_table(args) -> int:
    from ddfast.experiments.softlabel import format_softlabel_table, softlabel_table as run_table

    table, teacher_acc = run_table(args.dataset, tuple(args.ipc), sets=tuple(args.sets), regimes=tuple(args.regimes),
                                   models=args.models, seed=args.seed, out=args.out, budget=args.budget,
                                   progress=not args.no_progress, iterations=args.iterations, root=args.root,
                                   log=lambda msg: print(msg, flush=True))
    print(f"{args.dataset}: test accuracy (%) of {args.models} fresh ConvNets per cell; teacher {teacher_acc:.2f}%")
    print(format_softlabel_table(table, args.ipc, tuple(args.regimes)))
    print(f"results: {os.path.join(args.out, f'softlabel-{args.dataset}.json')}")
    return 0


def dcs(args) -> int:
    from ddfast.evaluate.dcs import format_dcs
    from ddfast.experiments.dcs import dcs_study

    for loss in args.loss:
        result = dcs_study(args.dataset, loss, tuple(args.ipc), seeds=tuple(args.seeds), models=args.models,
                           budget=args.budget, repeats=args.repeats, out=args.out, root=args.root,
                           progress=not args.no_progress)
        print(f"{loss.upper()} on {args.dataset}: {result.n} subsets")
        print(format_dcs(result))
        print(f"scatter plot: {os.path.join(args.out, f'dcs-{args.dataset}-{loss}.png')}")
    return 0


def e2e_parity(args) -> int:
    from ddfast.experiments.e2e_parity import format_parity, parity

    rows = parity(args.studies, args.modes, out=args.out, target_dir=args.target, seed=args.seed,
                  ld_epochs={"digits": args.ld_epochs_digits, "mnist": args.ld_epochs_mnist}, krr_steps=args.krr_steps)
    print(format_parity(rows))
    return 0
