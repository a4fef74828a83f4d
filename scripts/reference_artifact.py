"""Rebuild tests/data/reference-artifact: convert the embedded teacher with
tests/data/reference_artifact.yaml through `linearize convert` (the code path of every
conversion), then record, in a fresh process, the rebuilt model's logits on a fixed prompt
beside it (expected.safetensors). tests/test_reference_artifact.py loads the folder and checks
that the model it rebuilds gives those logits. The tokenizer files are left out of the folder
(`linearize.load` then takes the base model's), which keeps it small.

    python scripts/reference_artifact.py                 # convert, then record
    python scripts/reference_artifact.py --record-only   # record again from the artifact as it is
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "tests/data/reference_artifact.yaml"
OUT = ROOT / "tests/data/reference-artifact"
PROMPT = ("There is an important info hidden inside a lot of irrelevant text. The grass is green. The sky is blue. "
          "The sun is yellow. Here we go. There and back again. The pass key is 48213. Remember it. "
          "48213 is the pass key. The grass is green. The sky is blue. What is the pass key? The pass key is")
NEW_TOKENS = 8

# the logits of four positions (first, last, two between: before and after the 16-token window
# has filled), every position's top token and a greedy continuation
RECORD = """
import sys, torch, linearize
from safetensors.torch import save_file
model, tok = linearize.load(sys.argv[1], return_tokenizer=True)
ids = tok(sys.argv[2], return_tensors="pt")["input_ids"]
with torch.no_grad():
    logits = model(ids).logits[0]
T = ids.shape[1]
positions = torch.tensor([0, T // 3, 2 * T // 3, T - 1])
out = model.generate(ids, max_new_tokens=int(sys.argv[3]), do_sample=False)[0, T:]
save_file({"input_ids": ids[0], "positions": positions, "logits": logits[positions].contiguous(),
           "top_tokens": logits.argmax(-1), "generated": out}, sys.argv[4])
print(tok.decode(out))
"""


def record(folder: Path) -> None:
    """Write ``folder/expected.safetensors`` from the model ``folder`` rebuilds, in a fresh process."""
    subprocess.run([sys.executable, "-c", RECORD, str(folder), PROMPT, str(NEW_TOKENS), str(folder / "expected.safetensors")],
                   check=True)


def main() -> None:
    if sys.argv[1:] == ["--record-only"]:  # the artifact as it is; only the expected outputs again
        record(OUT)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        subprocess.run(["linearize", "convert", "--recipe", str(RECIPE), "--out", str(run)], check=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                     "vocab.json", "merges.txt"):
            (run / name).unlink(missing_ok=True)
        record(run)
        if OUT.exists():
            shutil.rmtree(OUT)
        shutil.copytree(run, OUT)
    for f in sorted(OUT.iterdir()):
        print(f"{f.stat().st_size:>9}  {f.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
