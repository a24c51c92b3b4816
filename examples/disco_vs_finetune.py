"""DISCO keeps task A where Finetune forgets it.

Two stages of Task-related FCIT on FCIT-mini: stage 1 trains task A (ImageNet-R), stage 2 task B (ArxivQA), five
clients, the embedded tiny VLM, about half a minute on a CPU. Each method runs FCIT's loop: for every stage, its
communication rounds, then an evaluation on the tasks seen so far. The numbers are those of
`python fcit.py --setting task-hom --stages 2 --methods disco,finetune --local-epochs 1 --eval-samples 20`.

    python examples/disco_vs_finetune.py
"""
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fcit
import federate

FLAGS = ["--setting", "task-hom", "--stages", "2", "--local-epochs", "1", "--eval-samples", "20"]


def accuracy_matrix(method, cfg, bench):
    """Row t: the scores (0-100) of the tasks seen by stage t, after stage t."""
    model, tokenizer, improc, text_encoder = fcit.load_model(cfg, "cpu", "float32")
    fed = federate.Federation(model, tokenizer, improc, dataclasses.replace(cfg, method=method, dtype="float32"),
                              text_encoder)
    matrix = []
    for stage in range(bench.stages):
        for rnd in range(cfg.rounds):
            fed.run_round(stage, rnd, bench.client_data(stage))   # sampled clients train; the server aggregates
        fed.end_stage(stage)
        matrix.append(fcit.evaluate(fed, bench, bench.seen(stage)))
    return matrix


def main():
    cfg = fcit.resolve_config(fcit.build_parser().parse_args(FLAGS))
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    bench = fcit.Benchmark(cfg, log=lambda msg: None)
    print(f"task A: {bench.tasks[0]} (stage 1), task B: {bench.tasks[1]} (stage 2); scores 0-100")
    print("| method   | A after stage 1 | A after stage 2 | B after stage 2 |")
    print("|----------|-----------------|-----------------|-----------------|")
    for method in ("disco", "finetune"):
        m = accuracy_matrix(method, cfg, bench)
        print(f"| {method:<8} | {m[0][0]:15.1f} | {m[1][0]:15.1f} | {m[1][1]:15.1f} |", flush=True)


if __name__ == "__main__":
    main()
