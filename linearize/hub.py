"""Publishing a converted model to the Hugging Face Hub, with a model card.

``linearize push DIR REPO_ID`` (or ``convert ... --push-to-hub REPO_ID``) uploads the folder
``linearize convert`` wrote (the small artifact: trained parts, base model id, tokenizer,
report) plus a generated ``README.md``. ``--dry-run OUT`` writes the exact folder that would be
uploaded and touches no network. ``linearize.load("user/repo")`` loads it back.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import yaml

# Hub ids of the models linearize ships under a short name
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


class PushError(RuntimeError):
    """Uploading failed (the message says why and what to do)."""


def _hub_base(base: str) -> str | None:
    if base in HUB_IDS:
        return HUB_IDS[base]
    if Path(base).expanduser().exists() or base.endswith(".gguf"):
        return None  # a local file or folder: not something the Hub can link to
    return base if base.count("/") == 1 else None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def model_card(folder: str | Path, repo_id: str | None = None) -> str:
    """The README.md of a converted-model folder: front matter, what it is, how it was made,
    what it scores (teacher beside student), and how to load it."""
    import json

    from .io import read_config

    folder = Path(folder)
    config = read_config(folder)
    report_file = folder / "report.json"
    report = json.loads(report_file.read_text()) if report_file.is_file() else {}
    conv, base = config["conversion"], config["base_model"]
    hub_base = _hub_base(base)
    front = {"library_name": "linearize", "pipeline_tag": "text-generation",
             "tags": ["linearize", "linear-attention", conv["kind"]]}
    if hub_base:
        front["base_model"] = hub_base
    layers = conv["layers"]
    n_layers = config.get("num_hidden_layers")
    which = "all layers" if layers == "all" else f"layers {layers}"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {repo_id.split('/')[-1] if repo_id else folder.name}", "",
             f"`{hub_base or base}` ({config.get('model_type')}, {n_layers} layers) with its softmax attention replaced by "
             f"**{conv['kind']}** linear-attention students on {which}, made with "
             "[linearize](https://pypi.org/project/linearize/): attention transfer"
             + (", then LoRA" if config.get("lora") else "") + ". Decoding keeps a fixed-size state per converted layer "
             "instead of a growing KV cache.", ""]
    settings = {k: v for k, v in conv["settings"].items() if v is not None}
    lines += ["## Students", "", *_table(["setting", "value"], [[k, f"`{v}`"] for k, v in settings.items()]), ""]
    if config.get("lora"):
        lora = config["lora"]
        lines += [f"LoRA: rank {lora['rank']}, alpha {lora['alpha']}, on {', '.join(lora['target_modules'])}"
                  + (" (merged into the weights)." if lora.get("merged") else " (kept as a separate adapter)."), ""]
    stages = report.get("stages") or []
    if stages:
        rows = [[s["stage"], str(s["steps"]), f"{s['tokens']:,}", f"{s['seconds']:.0f} s"] for s in stages]
        lines += ["## Training", "", *_table(["stage", "steps", "tokens", "time"], rows), "",
                  f"Total: {sum(s['tokens'] for s in stages):,} training tokens on {report.get('device', '?')}.", ""]
    if "teacher_perplexity" in report and "student_perplexity" in report:
        from .pipeline import perplexity_rows

        rows = perplexity_rows(report)
        teacher = rows[0][1]
        lines += ["## Evaluation", "",
                  f"Held-out perplexity ({report.get('eval_tokens', '?')} tokens), teacher and student scored in the same run:", "",
                  *_table(["model", "perplexity", "vs teacher"], [[label, f"{v:.3f}", f"{v / teacher:.3f}x"] for label, v in rows]), ""]
    held = report.get("heldout_transfer") or {}
    if held.get("before") and held.get("after"):
        b, a = held["before"]["relative_error"], held["after"]["relative_error"]
        rows = [[str(i), f"{b[i]:.4f}", f"{a[i]:.4f}"] for i in sorted(b, key=int)]
        lines += ["Attention-transfer error per layer, `||y_student - y_teacher|| / ||y_teacher||` on held-out text:", "",
                  *_table(["layer", "before", "after"], rows),
                  f"| mean | {held['before']['mean_relative_error']:.4f} | {held['after']['mean_relative_error']:.4f} |", ""]
    target = repo_id or str(folder)
    lines += ["## Use", "", "```bash", "pip install linearize", "```", "", "```python", "import linearize", "",
              f'model, tokenizer = linearize.load("{target}", return_tokenizer=True)',
              'inputs = tokenizer("The lighthouse keeper", return_tensors="pt")',
              "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0]))", "```", "",
              "The folder holds only the trained parts and the name of the base model; `linearize.load` downloads "
              "the base model and rebuilds the converted one.", ""]
    if config.get("recipe"):
        lines += ["## Recipe", "", "```yaml", yaml.safe_dump(config["recipe"], sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def prepare_upload(folder: str | Path, staging: str | Path, repo_id: str | None = None) -> Path:
    """Write the exact folder that would be uploaded: the model folder plus its README.md."""
    from .io import atomic_folder, read_config

    folder, staging = Path(folder), Path(staging)
    read_config(folder)  # a clear error if this is not a converted-model folder
    inner, outer = folder.resolve(), staging.resolve()
    if outer == inner or inner in outer.parents or outer in inner.parents:
        raise PushError(f"the upload folder {staging} must lie outside the model folder {folder} (and not contain it)")
    if staging.exists() and any(staging.iterdir()) and not (
        (staging / "README.md").is_file() or (staging / "linearize.json").is_file()
    ):
        raise PushError(f"{staging} exists and is not an earlier upload folder; name a new or empty folder for the dry run")
    card = model_card(folder, repo_id)

    def write(tmp: Path):
        for item in folder.iterdir():
            if item.name.startswith("."):
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        (tmp / "README.md").write_text(card)

    return atomic_folder(Path(staging), write)


def push(folder, repo_id: str, *, dry_run_dir=None, private: bool = False, token=None, revision=None,
         commit_message: str | None = None) -> str:
    """Upload ``folder`` to ``repo_id`` (or, with ``dry_run_dir``, only write what would be
    uploaded there). Returns the repo URL or the dry-run folder."""
    if dry_run_dir is not None:
        return str(prepare_upload(folder, dry_run_dir, repo_id))
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        staged = prepare_upload(folder, Path(tmp) / "upload", repo_id)
        api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
            api.upload_folder(folder_path=str(staged), repo_id=repo_id, repo_type="model", revision=revision,
                              commit_message=commit_message or "Upload a model converted with linearize")
        except Exception as err:
            name = type(err).__name__
            hint = ("log in with `hf auth login` or set HF_TOKEN" if "Token" in name or "401" in str(err) or "403" in str(err)
                    else "check the network (HF_HUB_OFFLINE must be unset) and the repo id")
            raise PushError(f"could not push to {repo_id}: {name}: {str(err).splitlines()[0] if str(err) else ''}; {hint}") from None
    return str(url)
