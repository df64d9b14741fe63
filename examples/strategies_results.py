"""The experiments behind docs/strategies.rst: every algorithm on data generated in the library.

    python examples/strategies_results.py [--jobs 2] [--out docs/figures/strategies] [--runs strategies_runs]

Each run is one federation of examples/strategies_federation.py under ``openfl_api.simulate`` (a
backend thread and one frontend thread hosting every client), in a process of its own, once per seed
of ``SEEDS``. Finished runs are kept as JSON in ``--runs`` and not run again. The script then
writes, into ``--out``, one CSV table and one figure per experiment and the table of orderings,
which the docs include as they are:

- ``fedprox``: FedProx's Synthetic(1, 1), 30 clients, 10 per version, 20 local epochs (batch 10,
  lr 0.01, 20 versions); 0, 50 or 90 % of the drawn clients straggle (``randint(1, 20)`` epochs).
  FedAvg drops the stragglers; FedProx keeps their partial work, with mu = 0 and mu = 1.
- ``digits``: scikit-learn's digits, Dirichlet(0.1) over 20 clients, all of them every version,
  each running 1 to 5 local epochs drawn anew each version (batch 10, lr 0.05, 50 versions): FedAvg against
  FedProx, SCAFFOLD, FedNova, FedDyn and the server optimizers.
- ``robust``: digits over 10 clients (IID, and Dirichlet(0.1)), one local epoch; clients 0 and 1
  flip the sign of their update (plain, and boosted 4 times), 30 versions; FedAvg with and without the attack
  against Median, TrimmedMean(0.2), Krum(f=2), Multi-Krum(f=2), Bulyan(f=1) and norm clipping.
- ``qffl``: digits, Dirichlet(0.3) over 40 clients, 10 per version, one local epoch (batch 32, lr
  0.1, 200 versions): the spread of the clients' test accuracy for q = 0, 1 and 5.

The model is multinomial logistic regression throughout; accuracy is the global model's on the
clients' held-out samples, loss its training loss over every client's training samples. Needs
scikit-learn and matplotlib. It takes about twelve CPU-minutes, so it does not run with the tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

EXAMPLES = Path(__file__).resolve().parent
# Seeds per experiment: two where a run is cheap, one where it is not.
SEEDS = {"fedprox": (0,), "digits": (0, 1), "robust": (0,), "qffl": (0, 1)}
RUN_TIMEOUT = 1800  # seconds for one federation

FEDPROX = ["--data", "synthetic", "--alpha", "1", "--beta", "1", "--clients", "30", "--per_round", "10",
           "--epochs", "20", "--batch", "10", "--lr", "0.01", "--rounds", "20", "--work", "stragglers"]
DIGITS = ["--data", "digits", "--dirichlet", "0.1", "--clients", "20", "--per_round", "20", "--epochs", "5",
          "--work", "variable", "--batch", "10", "--lr", "0.05", "--rounds", "50"]
ROBUST = ["--data", "digits", "--clients", "10", "--per_round", "10", "--epochs", "1", "--batch", "10",
          "--lr", "0.05", "--rounds", "30", "--f", "2", "--bulyan_f", "1", "--trim", "0.2", "--max_norm", "0.5"]
QFFL = ["--data", "digits", "--dirichlet", "0.3", "--clients", "40", "--per_round", "10", "--epochs", "1",
        "--batch", "32", "--lr", "0.1", "--rounds", "200", "--algorithm", "qffl"]

DIGITS_ALGORITHMS = [
    ("FedAvg", ["--algorithm", "fedavg"]),
    ("FedProx (mu = 0.01)", ["--algorithm", "fedprox", "--mu", "0.01"]),
    ("SCAFFOLD", ["--algorithm", "scaffold"]),
    ("FedNova", ["--algorithm", "fednova"]),
    ("FedDyn (alpha = 0.01)", ["--algorithm", "feddyn", "--feddyn_alpha", "0.01"]),
    ("FedAvgM (lr 1, momentum 0.9)", ["--algorithm", "fedavgm", "--server_lr", "1.0"]),
    ("FedAdagrad (lr 0.1)", ["--algorithm", "fedadagrad", "--server_lr", "0.1"]),
    ("FedAdam (lr 0.1)", ["--algorithm", "fedadam", "--server_lr", "0.1"]),
    ("FedYogi (lr 0.1)", ["--algorithm", "fedyogi", "--server_lr", "0.1"]),
]
ROBUST_RULES = [("FedAvg", "fedavg"), ("Median", "median"), ("TrimmedMean (0.2)", "trimmedmean"),
                ("Krum (f = 2)", "krum"), ("Multi-Krum (f = 2)", "multikrum"), ("Bulyan (f = 1)", "bulyan"),
                ("Clip (max_norm 0.5)", "clip")]


def experiments() -> List[Tuple[str, str, List[str]]]:
    """``(experiment, run name, arguments)`` of every run, seeds excluded."""
    runs = []
    for stragglers in ("0", "0.5", "0.9"):
        work = ["--stragglers", stragglers]
        runs.append(("fedprox", f"fedavg-drop-{stragglers}", [*FEDPROX, *work, "--algorithm", "fedavg",
                                                               "--drop_stragglers"]))
        for mu in ("0", "1"):
            runs.append(("fedprox", f"fedprox-mu{mu}-{stragglers}", [*FEDPROX, *work, "--algorithm", "fedprox",
                                                                     "--mu", mu]))
    for label, argv in DIGITS_ALGORITHMS:
        runs.append(("digits", label, [*DIGITS, *argv]))
    for partition in ("0", "0.1"):
        runs.append(("robust", f"clean-{partition}", [*ROBUST, "--dirichlet", partition, "--algorithm", "fedavg"]))
        for scale in ("1", "4"):
            for _, name in ROBUST_RULES:
                runs.append(("robust", f"{name}-signflip{scale}-{partition}",
                             [*ROBUST, "--dirichlet", partition, "--algorithm", name, "--attack", "signflip",
                              "--malicious", "2", "--attack_scale", scale]))
    for q in ("0", "1", "5"):
        runs.append(("qffl", f"q{q}", [*QFFL, "--q", q]))
    return runs


def run_one(job: Tuple[str, str, List[str], int, str]) -> str:
    """Run one federation in a process of its own, as the docs' commands do, and write its history;
    a run that fails or outlives ``RUN_TIMEOUT`` is run once more. Returns the file."""
    experiment, name, argv, seed, folder = job
    target = Path(folder) / experiment / f"{name}-s{seed}.json"
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_suffix(".tmp")
    command = [sys.executable, "-m", "openfl_api.simulate", "--nproc_per_node", "2", "--timeout",
               str(RUN_TIMEOUT), str(EXAMPLES / "strategies_federation.py"), *argv, "--seed", str(seed),
               "--history", str(temporary)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(EXAMPLES.parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    for attempt in (1, 2):
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT + 60)
            if result.returncode == 0 and temporary.exists():
                temporary.replace(target)
                print(f"done {experiment}/{name} seed {seed}", flush=True)
                return str(target)
            reason = f"exit status {result.returncode}: {result.stderr[-2000:]}"
        except subprocess.TimeoutExpired:
            reason = f"no end within {RUN_TIMEOUT + 60} s"
        print(f"{experiment}/{name} seed {seed}, try {attempt}: {reason}", flush=True)
    raise RuntimeError(f"{experiment}/{name} seed {seed} failed twice; see above")


def load(folder: Path, experiment: str, name: str) -> List[List[Dict[str, Any]]]:
    return [json.loads((folder / experiment / f"{name}-s{seed}.json").read_text()) for seed in SEEDS[experiment]]


def final(histories: List[List[Dict[str, Any]]], key: str) -> float:
    """The mean over the seeds of the last version's ``key``."""
    return statistics.fmean(h[-1][key] for h in histories)


def spread(histories: List[List[Dict[str, Any]]], key: str) -> str:
    values = [h[-1][key] for h in histories]
    return " / ".join(f"{v:.3f}" for v in values)


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)


def tables_and_figures(runs: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)

    # FedProx: final training loss, its worst value over the last 10 versions, test accuracy
    rows, figure = [], plt.figure(figsize=(10, 3.2))
    for column, stragglers in enumerate(("0", "0.5", "0.9")):
        axes = figure.add_subplot(1, 3, column + 1)
        for label, name in (("FedAvg (drops stragglers)", f"fedavg-drop-{stragglers}"),
                            ("FedProx, mu = 0", f"fedprox-mu0-{stragglers}"),
                            ("FedProx, mu = 1", f"fedprox-mu1-{stragglers}")):
            histories = load(runs, "fedprox", name)
            worst = statistics.fmean(max(r["loss"] for r in h[-10:]) for h in histories)
            rows.append([f"{int(float(stragglers) * 100)} %", label, spread(histories, "loss"), f"{worst:.3f}",
                         percent(final(histories, "accuracy"))])
            axes.plot([r["version"] for r in histories[0]], [r["loss"] for r in histories[0]], label=label,
                      linewidth=1)
        axes.set_title(f"{int(float(stragglers) * 100)} % stragglers")
        axes.set_xlabel("version")
        axes.set_ylim(0, 5)
        if column == 0:
            axes.set_ylabel("training loss (seed 0)")
            axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "fedprox.png", dpi=80)
    plt.close(figure)
    write_csv(out / "fedprox.csv", ["stragglers", "algorithm", "final training loss",
                                    "worst loss, last 10 versions", "test accuracy %"], rows)

    # digits, Dirichlet(0.1), variable local epochs
    rows, figure = [], plt.figure(figsize=(6, 3.6))
    axes = figure.add_subplot(1, 1, 1)
    for label, _ in DIGITS_ALGORITHMS:
        histories = load(runs, "digits", label)
        rows.append([label, percent(final(histories, "accuracy")),
                     " / ".join(percent(h[-1]["accuracy"]) for h in histories), f"{final(histories, 'loss'):.3f}"])
        axes.plot([r["version"] for r in histories[0]], [r["accuracy"] for r in histories[0]], label=label,
                  linewidth=1)
    axes.set_xlabel("version")
    axes.set_ylabel("test accuracy (seed 0)")
    axes.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(out / "digits.png", dpi=80)
    plt.close(figure)
    seeds = "seed " + " / ".join(map(str, SEEDS["digits"]))
    write_csv(out / "digits.csv", ["algorithm", "test accuracy %", seeds, "training loss"], rows)

    # robust rules under sign flips
    rows, figure = [], plt.figure(figsize=(10, 3.4))
    for column, partition in enumerate(("0", "0.1")):
        clean = load(runs, "robust", f"clean-{partition}")
        where = "IID" if partition == "0" else "Dirichlet(0.1)"
        rows.append([where, "FedAvg", "none", percent(final(clean, "accuracy")), "0.0"])
        axes = figure.add_subplot(1, 2, column + 1)
        labels, attacked = [], {"1": [], "4": []}
        for label, name in ROBUST_RULES:
            labels.append(label)
            for scale in ("1", "4"):
                histories = load(runs, "robust", f"{name}-signflip{scale}-{partition}")
                accuracy = final(histories, "accuracy")
                attacked[scale].append(100 * accuracy)
                rows.append([where, label, f"sign flip x{scale}", percent(accuracy),
                             f"{100 * (accuracy - final(clean, 'accuracy')):+.1f}"])
        positions = range(len(labels))
        axes.bar([p - 0.2 for p in positions], attacked["1"], width=0.4, label="sign flip")
        axes.bar([p + 0.2 for p in positions], attacked["4"], width=0.4, label="sign flip x4")
        axes.axhline(100 * final(clean, "accuracy"), color="black", linewidth=1, label="FedAvg, no attack")
        axes.set_xticks(list(positions))
        axes.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        axes.set_ylim(0, 100)
        axes.set_title(f"digits, {where}, 2 of 10 clients attack")
        if column == 0:
            axes.set_ylabel("test accuracy %")
            axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "robust.png", dpi=80)
    plt.close(figure)
    write_csv(out / "robust.csv", ["partition", "aggregator", "attack", "test accuracy %",
                                   "points against clean FedAvg"], rows)

    # q-FFL: spread of the clients' accuracy
    rows = []
    for q in ("0", "1", "5"):
        histories = load(runs, "qffl", f"q{q}")
        means, stds, worst = [], [], []
        for h in histories:
            clients = sorted(h[-1]["clients"])
            means.append(statistics.fmean(clients))
            stds.append(statistics.pstdev(clients))
            tenth = max(1, len(clients) // 10)
            worst.append(statistics.fmean(clients[:tenth]))
        rows.append([q, percent(statistics.fmean(means)), percent(statistics.fmean(stds)),
                     percent(statistics.fmean(worst))])
    write_csv(out / "qffl.csv", ["q", "mean client accuracy %", "std of client accuracy (points)",
                                 "worst 10 % of clients %"], rows)
    write_csv(out / "orderings.csv", ["experiment", "published ordering", "measured here",
                                      "holds here"], orderings(runs))


def orderings(runs: Path) -> List[List[str]]:
    """Each published ordering, what the runs measured, and whether it holds here."""
    rows = []

    def row(experiment: str, claim: str, measured: str, holds: bool) -> None:
        rows.append([experiment, claim, measured, "yes" if holds else "no"])

    for stragglers in ("0.5", "0.9"):
        avg = final(load(runs, "fedprox", f"fedavg-drop-{stragglers}"), "loss")
        for mu in ("0", "1"):
            prox = final(load(runs, "fedprox", f"fedprox-mu{mu}-{stragglers}"), "loss")
            row("fedprox", f"{int(float(stragglers) * 100)} % stragglers: FedProx (mu = {mu}) trains to a training "
                "loss no higher than FedAvg dropping the stragglers", f"{prox:.3f} against {avg:.3f}", prox <= avg)
    fedavg = final(load(runs, "digits", "FedAvg"), "accuracy")
    for label in ("SCAFFOLD", "FedNova"):
        other = final(load(runs, "digits", label), "accuracy")
        row("digits", f"variable local epochs: {label} reaches a test accuracy at least FedAvg's",
            f"{percent(other)} % against {percent(fedavg)} %", other >= fedavg)
    for partition in ("0", "0.1"):
        where = "IID" if partition == "0" else "Dirichlet(0.1)"
        clean = final(load(runs, "robust", f"clean-{partition}"), "accuracy")
        for scale in ("1", "4"):
            attack = f"sign flip x{scale}"
            attacked = final(load(runs, "robust", f"fedavg-signflip{scale}-{partition}"), "accuracy")
            row("robust", f"{where}, {attack}: FedAvg falls more than 3 points below clean FedAvg",
                f"{percent(attacked)} % against {percent(clean)} %", attacked < clean - 0.03)
            for label, name in (("Median", "median"), ("TrimmedMean", "trimmedmean"), ("Krum", "krum")):
                value = final(load(runs, "robust", f"{name}-signflip{scale}-{partition}"), "accuracy")
                row("robust", f"{where}, {attack}: {label} stays within 3 points of clean FedAvg",
                    f"{percent(value)} % against {percent(clean)} %", value >= clean - 0.03)
    spreads = {}
    for q in ("0", "5"):
        histories = load(runs, "qffl", f"q{q}")
        spreads[q] = statistics.fmean(statistics.pstdev(h[-1]["clients"]) for h in histories)
    row("qffl", "a larger q spreads the clients' accuracy less (q = 5 against q = 0)",
        f"std {percent(spreads['5'])} against {percent(spreads['0'])} points", spreads["5"] < spreads["0"])
    return rows


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1, help="federations run at once, one process each")
    parser.add_argument("--runs", default="strategies_runs", help="folder of the finished runs")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "figures" / "strategies"))
    parser.add_argument("--only", default="", help="comma-separated experiments to run (default: all)")
    args = parser.parse_args(argv)
    wanted = set(filter(None, args.only.split(",")))
    jobs = [(experiment, name, argv, seed, args.runs) for experiment, name, argv in experiments()
            if not wanted or experiment in wanted for seed in SEEDS[experiment]]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(run_one, jobs))
    if not wanted:
        tables_and_figures(Path(args.runs), Path(args.out))
        print(f"tables and figures written to {args.out}")


if __name__ == "__main__":
    main()
