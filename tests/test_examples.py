"""The examples run as a reader runs them and show what they say."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_disco_keeps_task_a_where_finetune_forgets_it():
    script = os.path.join(ROOT, "examples", "disco_vs_finetune.py")
    out = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600, check=True).stdout
    lines = out.splitlines()
    assert lines[:3] == ["task A: ImageNet-R (stage 1), task B: ArxivQA (stage 2); scores 0-100",
                         "| method   | A after stage 1 | A after stage 2 | B after stage 2 |",
                         "|----------|-----------------|-----------------|-----------------|"]
    rows = {}
    for line in lines[3:]:
        name, *cells = [c.strip() for c in line.strip("|").split("|")]
        rows[name] = [float(c) for c in cells]
    assert list(rows) == ["disco", "finetune"] and all(len(r) == 3 for r in rows.values())
    assert all(0 <= v <= 100 for r in rows.values() for v in r)
    # measured: disco 35.0 40.0 35.0, finetune 25.0 0.0 35.0
    disco, finetune = rows["disco"], rows["finetune"]
    assert finetune[1] < finetune[0]                # Finetune forgets task A once it trains task B
    assert disco[1] >= finetune[1] + 20             # DISCO keeps it in a subspace of its own
