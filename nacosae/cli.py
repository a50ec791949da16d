"""One CLI layer: argparse flags generated from a config dataclass (field docstrings become --help text)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import sys
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def field_docs(cls) -> dict[str, str]:
    """Docstrings written under dataclass fields (the STYLE.md convention), read from the source."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for prev, node in zip(body, body[1:]):
        if isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name) and isinstance(node, ast.Expr) \
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_text = (docs.get(f.name, "") + ("" if required else f" (default: {default})")).replace("%", "%%")
        tp = hints[f.name]
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(flag, type=_parser_for(tp), default=default, required=required, help=help_text)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kwargs.update(overrides)
    return cls(**kwargs)


def _parser_for(tp):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        inner = _parser_for(args[0])
        return lambda s: None if s.lower() == "none" else inner(s)
    if origin is tuple:
        inner = _parser_for(args[0]) if args else str
        return lambda s: tuple(inner(p) for p in s.split(",") if p.strip())
    if tp in (int, float, str):
        return tp
    return str


# ---------------------------------------------------------------------------------------------------------------- the `nacosae` command
#
# One subcommand per pipeline stage. STAGES is the one place that says which code runs a stage: a target is
# "package.module:function" (installed code, any install) or "path/in/the/checkout.py:function" / "app.py" (a
# script of the source checkout, run as the scripts run today; needs `pip install -e .` from a clone). The
# function takes argv (a list of strings) and returns an exit code or None; a bare .py path runs as __main__.
# Each stage keeps its script's flags, resume behaviour and --help; `nacosae STAGE --help` shows them.

STAGES: dict[str, tuple[str | dict[str, str], str]] = {
    "extract": ("hub_scripts/extract.py:main", "backbone activations over an image source → activation store (resumable)"),
    "train": ("hub_scripts/train_sae.py:main", "train an SAE on an activation store (resumes from its checkpoint)"),
    "stats": ("hub_scripts/feature_stats.py:main", "per-feature statistics and top images of an SAE (resumable)"),
    "name": ("nacosae.naming.run:main", "name EVERY live feature on the shared render pool, score each name by held-out "
                                        "CoSy, write the results dataset (resumable)"),
    "evaluate": ("hub_scripts/evaluate_names.py:main", "per-feature pipeline (name_features.py work folders): held-out "
                                                       "CoSy of its names and the Monosemanticity Score (resumable)"),
    "ms": ("hub_scripts/ms_table.py:main", "Monosemanticity Score of an SAE's features and its layer's raw channels "
                                            "with several image encoders side by side"),
    "build": ("hub_scripts/build_results.py:main", "per-feature pipeline: merge its work folder into a results dataset"),
    "publish": ({"sae": "hub_scripts/publish_sae.py:main", "results": "hub_scripts/publish_results.py:main"},
                "stage and upload SAEs ('publish sae') or the results dataset ('publish results') to the Hub"),
    "app": ("app.py", "the Gradio feature explorer (browse, what fires, name live, steer)"),
    "lab": ("hub_scripts/lab.py:main", "the small-network lab (experiment, figures, structure)"),
    "import": ("nacosae.cli:import_main", "convert another library's SAE (saev, SAELens, sparsify, dictionary_learning, "
                                          "Overcomplete) into a nacosae SAE folder"),
    "export": ("nacosae.cli:export_main", "write a nacosae SAE in SAELens's format (cfg.json + sae_weights.safetensors)"),
}

_EPILOG = """\
Someone else's SAE (saev, SAELens, sparsify, dictionary_learning, Overcomplete), named, scored and browsed:
  nacosae import their_sae/ --backbone efficientnet-lite0 --layer blocks.14 --tokens spatial \\
      --out runs/theirs/saes/efficientnet-lite0/blocks.14
  nacosae name --sae runs/theirs/saes/efficientnet-lite0/blocks.14 --out runs/theirs/results
  nacosae app --sae-repo runs/theirs/saes --results-repo runs/theirs/results
(the app reads an SAE repo in the Hub layout, one SAE per subfolder named by its id <backbone>/<layer>, the id
`nacosae name` gives it in the results)

`nacosae STAGE --help` lists every option of a stage. A wrong input (a missing file, a corrupt checkpoint, a width
that does not fit) ends with one line `nacosae STAGE: error: ...` and exit code 2; NACOSAE_TRACEBACK=1 shows the
traceback as well."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: one subparser per stage, for --help and the choice of stage; the stage's own parser
    reads everything after the stage name."""
    from nacosae import __version__

    parser = argparse.ArgumentParser(
        prog="nacosae", description="Train, name and evaluate the features of sparse autoencoders on vision models.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"nacosae {__version__}")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True, title="stages")
    for name, (_, help_text) in STAGES.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nacosae` console script: `nacosae STAGE [options]`. A user error (USER_ERRORS) ends with one
    line on stderr and exit code 2 (NACOSAE_TRACEBACK=1: raised as is); `run_stage` raises it."""

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-") or argv[0] not in STAGES:
        parser.parse_args(argv[:1])  # prints help / version, or argparse's "invalid choice" error; exits
    target = STAGES[argv[0]][0]
    stage = argv[0] + (f" {argv[1]}" if isinstance(target, dict) and argv[1:2] and argv[1] in target else "")
    try:
        return run_stage(argv[0], argv[1:])
    except USER_ERRORS as e:
        if os.environ.get("NACOSAE_TRACEBACK"):
            raise
        print(user_error_message(stage, e), file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        if os.environ.get("NACOSAE_TRACEBACK"):
            raise
        resume = "" if stage == "app" else "; run the same command again to continue where it stopped"
        print(f"nacosae {stage}: interrupted{resume}", file=sys.stderr)
        return 130


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
"""Exceptions that report a wrong input rather than a bug, shown as one line by `main` (no traceback): nacosae's own
input errors all derive from ValueError (CheckpointError, StoreError, BadImageError, ValidationError, RepoRefused,
ServeError, PoolMismatchError, FeatureStatsError), missing or unreadable files and unreachable hosts from OSError
(FileNotFoundError, PermissionError, ConnectionError). Anything else is a bug and keeps its traceback."""
USER_ERROR_EXIT = 2
"""Exit code of a user error, as argparse's for a bad flag."""


def user_error_message(stage: str, error: BaseException) -> str:
    """`nacosae STAGE: error: <the exception's text>` (its type's name when the text is empty)."""
    return f"nacosae {stage}: error: {str(error).strip() or type(error).__name__}"


def run_stage(stage: str, argv: list[str]) -> int:
    """Run one stage with its own arguments; returns its exit code (errors propagate: `main` reports them)."""
    target, _ = STAGES[stage]
    prog = f"nacosae {stage}"
    if isinstance(target, dict):  # a stage with sub-stages, e.g. `nacosae publish sae ...`
        if not argv or argv[0] not in target:
            sub = argparse.ArgumentParser(prog=prog, description=STAGES[stage][1])
            sub.add_argument("what", choices=sorted(target), help="what to " + stage)
            sub.parse_args(argv[:1])
        target, prog, argv = target[argv[0]], f"{prog} {argv[0]}", argv[1:]
    old_argv = sys.argv
    sys.argv = [prog, *argv]  # argparse's usage line then reads `nacosae STAGE ...`
    try:
        code = _resolve(target, stage)(argv)
    finally:
        sys.argv = old_argv
    return int(code or 0)


def _resolve(target: str, stage: str):
    """The callable behind a STAGES target (see the comment above STAGES)."""
    import importlib
    import importlib.util
    import runpy
    from pathlib import Path

    path, _, func = target.partition(":")
    if not path.endswith(".py"):
        return getattr(importlib.import_module(path), func)
    file = Path(__file__).resolve().parents[1] / path
    if not file.is_file():
        raise SystemExit(f"`nacosae {stage}` runs {path} from nacosae's source checkout, which this install does not "
                         f"have ({file} is missing): clone the repository and `pip install -e .` there")
    if not func:  # a script that reads sys.argv and runs under __main__ (app.py)
        def run_as_main(argv):
            # runpy sets argv[0] to the file's path: the script reads its usage name from NACOSAE_PROG instead
            os.environ["NACOSAE_PROG"] = sys.argv[0]
            runpy.run_path(str(file), run_name="__main__")
            return 0

        return run_as_main
    spec = importlib.util.spec_from_file_location(f"nacosae_stage_{stage}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, func)


def import_main(argv: list[str] | None = None) -> int:
    """`nacosae import`: another library's checkpoint → a nacosae SAE folder (config.json + model.safetensors)."""
    from pathlib import Path

    from nacosae.interop import FORMATS, load_foreign_sae

    p = argparse.ArgumentParser(
        description="Convert an SAE checkpoint of another library into a nacosae SAE folder that every nacosae stage "
                    "reads. The converted SAE computes the library's own codes (see nacosae/interop.py for each "
                    "format and version). Give the activations' provenance with --backbone/--layer/--tokens when the "
                    "checkpoint does not record it (saev, Overcomplete): the layer's width is checked against the SAE.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="the checkpoint: a file (saev sae.pt, an Overcomplete state_dict) or a folder")
    p.add_argument("--out", required=True, help="nacosae SAE folder to write (config.json + model.safetensors); "
                                                "`nacosae app --sae-repo REPO` finds it as REPO/<backbone>/<layer>, "
                                                "e.g. --out runs/theirs/saes/efficientnet-lite0/blocks.14")
    p.add_argument("--format", choices=FORMATS, default=None, help="the checkpoint's format (default: detected from its files)")
    p.add_argument("--subfolder", default=None, help="a folder inside SRC, e.g. a sparsify hookpoint")
    p.add_argument("--backbone", default=None, help="backbone spec the activations came from (nacosae.backbones.load_backbone), "
                                                    "e.g. efficientnet-lite0; loads it to check the layer width")
    p.add_argument("--pretrained", default=None, help="open_clip only: the pretrained weights tag of --backbone")
    p.add_argument("--layer", default=None, help="the backbone layer the SAE reads (default: the checkpoint's own record)")
    p.add_argument("--tokens", default=None, help="which tokens of the layer the SAE was trained on: cls, patches, all, spatial, mean")
    p.add_argument("--sae-class", default=None, help="Overcomplete only: the class that wrote the state_dict (SAE, TopKSAE, JumpSAE)")
    p.add_argument("--top-k", type=int, default=None, help="Overcomplete TopKSAE only: its top_k")
    p.add_argument("--device", default="cpu", help="torch device of the backbone used for the width check (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an SAE already in --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    if (out / "model.safetensors").is_file() and not args.overwrite:
        print(f"{out} already holds an SAE; pass --overwrite to convert again")
        return 0
    provenance = {k: v for k, v in (("backbone", args.backbone), ("layer", args.layer), ("tokens", args.tokens)) if v}
    hints = {k: v for k, v in (("sae_class", args.sae_class), ("top_k", args.top_k)) if v is not None}
    backbone = None
    if args.backbone:
        from nacosae.backbones import load_backbone

        backbone = load_backbone(args.backbone, device=args.device, **({"pretrained": args.pretrained} if args.pretrained else {}))
    sae = load_foreign_sae(args.src, format=args.format, provenance=provenance, subfolder=args.subfolder,
                           backbone=backbone, **hints)
    sae.save_pretrained(out)
    prov, peer = sae.cfg.provenance, sae.cfg.provenance["imported_from"]
    print(f"{peer['library']} {peer.get('library_version') or ''} {peer['architecture']} → nacosae {sae.cfg.activation} "
          f"(d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}{f', k={sae.cfg.k}' if 'topk' in sae.cfg.activation or sae.cfg.activation == 'batchtopk' else ''}); "
          f"backbone={prov.get('backbone')} layer={prov.get('layer')} tokens={prov.get('tokens')}; wrote {out}")
    if not (prov.get("backbone") and prov.get("layer")):
        print("note: the checkpoint does not say which backbone layer it reads; give --backbone/--layer/--tokens to the "
              "stages that run the backbone")
    return 0


def export_main(argv: list[str] | None = None) -> int:
    """`nacosae export`: a nacosae SAE → another library's format (SAELens)."""
    from nacosae.interop import export_sae_lens
    from nacosae.sae import SAE

    p = argparse.ArgumentParser(description="Write a nacosae SAE in SAELens's format, loadable with "
                                            "sae_lens.SAE.load_from_disk and the tools built on SAELens.")
    p.add_argument("sae", help="nacosae SAE folder (config.json + model.safetensors) or Hub repo id")
    p.add_argument("--subfolder", default=None, help="subfolder of the SAE in a Hub repo")
    p.add_argument("--to", choices=("sae_lens",), default="sae_lens", help="target format (default: sae_lens)")
    p.add_argument("--out", required=True, help="folder to write (cfg.json + sae_weights.safetensors)")
    args = p.parse_args(argv)
    sae = SAE.from_pretrained(args.sae, subfolder=args.subfolder)
    out = export_sae_lens(sae, args.out)
    print(f"wrote {out} (SAELens architecture of nacosae {sae.cfg.activation}, d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae})")
    return 0
