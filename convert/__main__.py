"""`python -m convert`: export moby_jax checkpoints as PyTorch `.pth` files, import released
MoBY checkpoints, inspect `.pth` files: a thin layer over the `convert` package
(`convert.save`, `convert.from_pytorch`, `convert.inspection`).

  python -m convert export WORKDIR_OR_STEP_DIR --format F -o OUT.pth [--step N]
      [--branch online|target] [--num-classes N] [--force]
  python -m convert import IN.pth --config CONFIG.py[:ARG] [--config.x.y=V ...] --workdir DIR
      [--step N]
  python -m convert inspect FILE.pth

Every command exits 0 on success and 1 with an `error:` line naming the problem; a failed
export or import writes nothing.
"""

import argparse
import json
import pathlib
import shutil
import sys
import textwrap
from collections.abc import Mapping

import jax

import convert
import moby_jax
from convert import inspection, keys, load, names, pth
from convert.meta import architecture
from moby_jax import checkpoint, parallel
from moby_jax.config_file import load_config
from moby_jax.models import build_encoder

FORMAT_HELP = "\n".join(
    [textwrap.fill(f"{spec.summary}, in {{{spec.container!r}: ...}}", 78,
                   initial_indent=f"  {name:9s} ", subsequent_indent=" " * 12)
     for name, spec in names.FORMATS.items()]
    + ["  mmdet and mmseg are Swin only: a DeiT encoder is refused (OpenMMLab has no",
       "  Swin-style mapping for it; use backbone). mmdet/mmseg/timm also refuse the",
       "  MoBY-BN variant, ape=True and patch_norm=False, which their Swin cannot",
       "  express. A headless timm file loads with timm.create_model(...,",
       "  checkpoint_path=FILE); timm's pretrained-file loader (pretrained_cfg_overlay)",
       "  takes the backbone format, or a timm file with --num-classes. Every file also",
       "  holds a top-level 'meta' entry (plain Python types)."])


class CliError(ValueError):
  """A command cannot go on; the message says why."""


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m convert", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Convert between moby_jax checkpoints and PyTorch .pth files.",
      epilog="formats:\n" + FORMAT_HELP)
  commands = parser.add_subparsers(dest="command", required=True)

  export = commands.add_parser(
      "export", formatter_class=argparse.RawDescriptionHelpFormatter,
      help="write a training workdir's checkpoint as a .pth file",
      description=textwrap.fill(
          "Write a checkpoint of a training workdir (latest complete step, or --step) or of "
          "one step directory (WORKDIR/checkpoints/<step>) as a .pth file, then read the "
          "file back and check it: key set and shapes of the format, finite values, the "
          "inverse map giving back the exported arrays bit for bit, and every downstream "
          "loader taking all the tensors its model needs. An existing output is replaced "
          "only with --force; a failed check leaves no file.", 80),
      epilog="formats:\n" + FORMAT_HELP)
  export.add_argument("source", help="training workdir or checkpoint step directory")
  export.add_argument("--format", required=True, choices=list(names.FORMATS))
  export.add_argument("-o", "--output", required=True, help="the .pth file to write")
  export.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  export.add_argument("--branch", choices=("online", "target"),
                      help="encoder for the backbone formats (default: online)")
  export.add_argument("--num-classes", type=int, default=0,
                      help="backbone/timm: add a zero-initialised N-class head (the Swin "
                           "classification repo's MODEL.PRETRAINED loader needs head.bias; "
                           "timm's pretrained-file loader recognises timm names by head.fc)")
  export.add_argument("--force", action="store_true", help="overwrite an existing output")

  imp = commands.add_parser(
      "import", help="read a released MoBY checkpoint into a new training workdir",
      description="Read an official MoBY checkpoint (a 'model' entry; 'config', 'optimizer' "
                  "and other entries are ignored and never executed) into an orbax checkpoint "
                  "that train.py resumes from or linear-evaluates. The optimizer state starts "
                  "fresh. Extra --config.x.y=V arguments override config fields.")
  imp.add_argument("input", help="official MoBY .pth file")
  imp.add_argument("--config", required=True,
                   help="config file, optionally with an argument: configs/moby_swin_tiny.py"
                        ":runlocal")
  imp.add_argument("--workdir", required=True, help="new training workdir (no checkpoints yet)")
  imp.add_argument("--step", type=int,
                   help="steps already done (default: (epoch + 1) x train.steps_per_epoch when "
                        "the file has an 'epoch' entry, else 0)")

  inspect = commands.add_parser(
      "inspect", help="describe a .pth file",
      description="Print the format of a .pth file, the architecture its key shapes imply, "
                  "parameter counts, its meta entry and any missing, unexpected or mis-shaped "
                  "keys against that format's key list (exit status 1 if there are any).")
  inspect.add_argument("file")
  return parser


# --------------------------------------------------------------------------------- export


def cmd_export(args) -> int:
  if pathlib.Path(args.source).is_file():
    raise CliError(f"{args.source} is a file: export reads a training workdir or checkpoint "
                   "step directory (import a released .pth into a workdir first)")
  if args.format == "official" and args.branch:
    raise CliError("--branch applies to the backbone formats; official holds both encoders")
  # One device is enough to read the arrays back (and needs 1/n of the memory).
  state, config = checkpoint.load_state(args.source, args.step,
                                        mesh=parallel.make_mesh(jax.devices()[:1]))
  if not isinstance(state, moby_jax.TrainState):
    raise CliError(f"{args.source} holds a {type(state).__name__}, not a MoBY pre-training "
                   "state")
  saved = convert.save(state, config, args.output, args.format, args.branch or "online",
                       args.num_classes, source=str(pathlib.Path(args.source).absolute()),
                       force=args.force)
  entry = names.FORMATS[args.format].container
  print(f"wrote {saved.path}: format {args.format} ({saved.tensors} tensors in {entry!r}), "
        f"step {saved.meta['step']}, {saved.meta['branch']} encoder, variant "
        f"{config.model.get('name')}")
  print("checked: key set and shapes, float32 and finite values, inverse map bit-exact")
  for line in saved.loaders:
    print(f"  {line}")
  return 0


# --------------------------------------------------------------------------------- import


def _describe(fields: Mapping) -> str:
  """The architecture-defining entries of encoder or head fields, as text."""
  shown = ("embed_dim", "depths", "depth", "num_heads", "window_size", "patch_size",
           "img_size", "proj_layers", "proj_hidden_dim", "proj_dim", "pred_layers",
           "pred_hidden_dim", "queue_size")
  return ", ".join(f"{k} {fields[k]}" for k in shown if fields.get(k) is not None)


def _import_step(args, ckpt, config) -> int:
  if args.step is not None:
    return args.step
  epoch = ckpt.get("epoch")
  if isinstance(epoch, int) and not isinstance(epoch, bool):
    return (epoch + 1) * int(config.train.steps_per_epoch)
  return 0


def _official_state_dict(path, ckpt) -> dict:
  sd = load.state_dict_of(ckpt, str(path))[1]
  fmt = inspection.detect(sd)
  if fmt != "official":
    raise CliError(f"{path} is a {fmt} file ({names.FORMATS[fmt].summary}); import needs "
                   "an official MoBY checkpoint (encoder, encoder_k, projector, projector_k, "
                   "predictor, queues)")
  return sd


def _remove_new(workdir: pathlib.Path, before: set | None) -> None:
  """Removes what an import added to `workdir` (all of it if the import created it)."""
  if not workdir.exists():
    return
  for entry in workdir.iterdir():
    if before is not None and entry in before:
      continue
    if entry.is_dir():
      shutil.rmtree(entry)
    else:
      entry.unlink()
  if before is None:
    workdir.rmdir()


def cmd_import(args, overrides) -> int:
  config = load_config(args.config, overrides)
  workdir = pathlib.Path(args.workdir)
  ckpts = workdir / checkpoint.CHECKPOINTS
  if ckpts.is_dir() and any(ckpts.iterdir()):
    raise CliError(f"{ckpts} already holds checkpoints; import needs a new workdir")
  ckpt = pth.read_pth(args.input)
  sd = _official_state_dict(args.input, ckpt)
  step = _import_step(args, ckpt, config)
  mesh = parallel.make_mesh(jax.devices()[:1])  # the state only passes through this host
  try:
    state = convert.from_pytorch(sd, config, "official", step=step, mesh=mesh)
  except convert.StateDictMismatch as err:
    heads = ("proj_layers", "proj_hidden_dim", "proj_dim", "pred_layers", "pred_hidden_dim",
             "queue_size")
    encoder = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    try:
      held = _describe({**inspection.infer_architecture(encoder)[0],
                        **inspection.infer_moby_heads(sd)})
    except (KeyError, TypeError, IndexError, ValueError):
      held = "a state whose architecture cannot be read from its shapes"
    wanted = _describe({**architecture(build_encoder(config.model), None),
                        **{k: config.moby.get(k) for k in heads}})
    raise CliError(f"{args.input} does not fit config {args.config}:\n  the file holds "
                   f"{held}\n  the config builds {config.model.get('name')}: {wanted}\n{err}"
                   ) from None
  before = set(workdir.iterdir()) if workdir.exists() else None
  try:
    checkpoint.write_state(workdir, state, config)
    restored, _ = checkpoint.load_state(workdir, mesh=mesh)
    back = convert.to_pytorch(restored, config, meta=False)["model"]
    # Bit-exact in the state's dtypes (a float16 file is stored as float32).
    differ = [k for k, v in sd.items() if back[k].shape != v.shape
              or back[k].tobytes() != v.astype(back[k].dtype).tobytes()]
    if differ:
      raise CliError(f"the written checkpoint reads back different from {args.input}: "
                     f"{', '.join(differ[:5])}")
  except BaseException:
    _remove_new(workdir, before)
    raise
  print(f"imported {args.input} into {workdir}: step {step}, variant "
        f"{config.model.get('name')}, {len(sd)} tensors (read back bit-exact); the "
        "optimizer state starts fresh")
  print("resume or evaluate with: " + " ".join(
      ["python train.py", f"--config {args.config}", *overrides, f"--workdir {workdir}"]))
  return 0


# -------------------------------------------------------------------------------- inspect


def _moby_config(model_fields: Mapping, sd: Mapping):
  """A MoBY config with this encoder and the heads/queue the official file holds."""
  from configs import moby_swin_tiny
  config = moby_swin_tiny.get_config()
  config.model = dict(model_fields)
  config.moby.update(inspection.infer_moby_heads(sd))
  return config


def cmd_inspect(args) -> int:
  ckpt = pth.read_pth(args.file)
  entry, sd = load.state_dict_of(ckpt, args.file)
  fmt = inspection.detect(sd)
  meta = ckpt.get("meta")
  print(f"file:         {args.file}")
  print(f"format:       {fmt} ({names.FORMATS[fmt].summary}); tensors in "
        f"{entry or 'the top level'}")
  if isinstance(meta, Mapping) and meta.get("format") not in (None, fmt):
    print(f"note:         meta says format {meta.get('format')!r}")
  encoder = ({k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
             if fmt == "official" else sd)
  fam = "deit" if "cls_token" in encoder else "swin"
  try:
    fields, notes = inspection.infer_architecture(names.to_original_names(fmt, encoder, fam))
    model_fields, more = inspection.model_config(fields)
    model = build_encoder(model_fields)
    config = _moby_config(model_fields, sd) if fmt == "official" else None
  except (KeyError, IndexError, TypeError, ValueError) as err:
    raise CliError(f"{args.file}: cannot infer the architecture from the key shapes "
                   f"({type(err).__name__}: {err})") from None
  print(f"architecture: {inspection.match_variant(fields) or 'custom'} ({fam}): "
        + ", ".join(f"{k} {'?' if v is None else v}" for k, v in fields.items()))
  if fields.get("img_size") is None and isinstance(meta, Mapping):
    notes.append(f"meta gives img_size {meta.get('architecture', {}).get('img_size')}")
  for note in notes + more:
    print(f"              {note}")
  if fmt == "official":
    parts = {p: inspection.parameter_count({k: v for k, v in sd.items() if k.startswith(p + ".")})
             for p in ("encoder", "encoder_k", "projector", "projector_k", "predictor")}
    print(f"heads:        {inspection.infer_moby_heads(sd)}")
    print(f"parameters:   {sum(parts.values()):,} ("
          + ", ".join(f"{p} {n:,}" for p, n in parts.items()) + ")")
  else:
    print(f"parameters:   {inspection.parameter_count(sd):,}")
  print("meta:         " + (json.dumps(meta, indent=2, default=str)
                            .replace("\n", "\n              ")
                            if meta is not None else "none"))
  problems = keys.compare_keys(sd, keys.expected_keys(fmt, model, config))
  if not problems:
    print(f"keys:         {len(sd)}, exactly the {fmt} key list with its shapes")
    return 0
  print(f"keys:         {len(sd)}, {len(problems)} problems against the {fmt} key list:")
  for problem in problems:
    print(f"  {problem}")
  return 1


def main(argv=None) -> int:
  """Runs one command; returns the exit status (0 ok, 1 error)."""
  args, extra = _parser().parse_known_args(sys.argv[1:] if argv is None else list(argv))
  try:
    if args.command == "import":
      return cmd_import(args, extra)
    if extra:
      raise CliError(f"unrecognised arguments: {' '.join(extra)}")
    return cmd_export(args) if args.command == "export" else cmd_inspect(args)
  except (ValueError, OSError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
