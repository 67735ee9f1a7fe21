"""The `vitune` command: parse arguments, call the library. No logic of its own.

    vitune data shapes|easy-vqa|inspect ...   vitune train ...   vitune chat ...
    vitune predict ...   vitune eval ...   vitune quickstart
    vitune merge MODEL OUT   vitune export --format hf MODEL OUT   vitune convert smollm2
Run `vitune COMMAND --help` for each command's options.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from vitune.config import ConfigError, Range, apply_overrides, load_yaml
from vitune.files import DataError
from vitune.serving.cli_args import add_serve_parser
from vitune.training.guard import Interrupted, TrainingError


def at_least(lo: int):
    """An argparse type: an integer >= lo (a clear usage error otherwise, naming the option)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
        return value
    parse.__name__ = f"integer >= {lo}"
    return parse


def number_in(allowed: Range):
    """An argparse type: a finite number in `allowed` (a clear usage error otherwise)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not allowed.ok(value):
            raise argparse.ArgumentTypeError(f"must be a finite number {allowed}, got {text!r}")
        return value
    parse.__name__ = f"number {allowed}"
    return parse


def _config(args):
    from vitune.presets import preset
    if bool(args.preset) == bool(args.config):
        raise ConfigError("give exactly one of --preset NAME or --config FILE.yaml")
    cfg = preset(args.preset) if args.preset else load_yaml(args.config)
    if args.on_bad_record:
        args.overrides.append(f"train.on_bad_record={args.on_bad_record}")
    return apply_overrides(cfg, args.overrides)


def _data_map(items: list[str], stages: list[str]) -> dict[str, str]:
    """`--data FILE` (every stage) or `--data STAGE=FILE`; a STAGE that is not a stage is refused."""
    out: dict[str, str] = {}
    for item in items:
        stage, sep, path = item.partition("=")
        if sep and not Path(item).exists():
            if stage not in stages:
                raise ConfigError(f"--data {item}: no stage named {stage!r}; the stages are {stages}")
            out[stage] = path
        else:
            out["*"] = item
    return out


def cmd_train(args) -> None:
    from vitune.training.train import train
    cfg = _config(args)
    data = _data_map(args.data, [s.name for s in cfg.train.stages])
    per_stage = {s.name: data.get(s.name) or data.get("*") or s.data for s in cfg.train.stages}
    result = train(cfg, per_stage, args.out, resume=args.resume, image_root=args.image_root,
                   stop_after=args.stop_after, overwrite=args.overwrite,
                   allow_outside_images=args.allow_outside_images, allow_config_change=args.allow_config_change)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, process 0 alone reports
        return
    if result.stopped:
        print(f"stopped after {result.global_step} steps (--stop-after): no model saved yet; the training state is "
              f"in {result.state}\ncontinue with the same command and --resume")
        return
    print(f"model saved to {result.model}\nchat with it:  vitune chat --model {result.model} --image IMAGE \"question\"")


def _gen(args):
    from vitune.inference.generate import GenerationConfig
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed, compile=getattr(args, "compile", False))


def cmd_chat(args) -> None:
    from vitune.data.processor import load_image
    from vitune.inference.assistant import Assistant
    from vitune.inference.chat_session import run_chat
    gen = _gen(args)  # bad values: an error before the model loads
    images = [load_image(p) for p in args.image]
    run_chat(Assistant.load(args.model, quantize=_quant(args)), images, gen, " ".join(args.question) or None)


def _quant(args):
    """`--quantize 8|4` as a QuantConfig (None without it)."""
    from vitune.model.quant import QuantConfig
    return QuantConfig(bits=args.quantize) if args.quantize else None


def cmd_quantize(args) -> None:
    from vitune.checkpoints.quantized import quantize_folder
    out = quantize_folder(args.model, args.out, bits=args.bits, group_size=args.group_size, overwrite=args.overwrite,
                          merge_adapters=args.merge_adapters)
    print(f"quantised model saved to {out}")


def cmd_predict(args) -> None:
    from vitune.evaluation.predict import run_predict
    report = run_predict(args.model, args.questions, args.out, args.image_root, args.batch_size,
                         precision=args.precision, on_bad_record=args.on_bad_record, overwrite=args.overwrite,
                         quantize=_quant(args))
    print(report.summary())


def cmd_eval(args) -> None:
    """Evaluate a model (`--model`, answers into `--out RUN_DIR`) or score `--predictions`, on a
    built-in `--bench` or `--questions` + `--answers`; `--out` is the results folder
    (vitune.evaluation.evaluate). Retrieval (`--bench shapes-retrieval`, or `--captions FILE`, which
    implies `--task retrieval`) ranks a model's alignment-head embeddings: no predictions.
    `--compare RUN_A RUN_B` puts two results folders side by side."""
    from vitune.evaluation.compare import compare_runs
    from vitune.evaluation.evaluate import run_eval
    from vitune.evaluation.results import EvalSpec
    if args.compare:
        given = [f"--{k.replace('_', '-')}" for k in ("model", "predictions", "bench", "questions", "answers",
                                                       "captions", "out", "max_questions", "task", "caption_prompt")
                 if getattr(args, k)]
        if given:
            raise ConfigError(f"--compare reads two results folders and takes no other input: drop {', '.join(given)}")
        print(compare_runs(*args.compare))
        return
    if bool(args.model) == bool(args.predictions):
        raise ConfigError("give exactly one of --model DIR or --predictions FILE (or --compare RUN_A RUN_B)")
    if args.bench and (args.questions or args.answers or args.captions or args.image_root):
        raise ConfigError(f"--bench {args.bench} brings its own questions, answers and images: drop --questions, "
                          "--answers, --captions and --image-root")
    if args.task == "retrieval" and not (args.bench or args.captions):
        instead = ", not --questions / --answers" if args.questions or args.answers else ""
        raise ConfigError("--task retrieval needs --bench shapes-retrieval or --captions FILE (JSONL rows "
                          '{"image": PATH, "caption": TEXT})' + instead)
    if not args.bench and not args.captions and not (args.questions and args.answers):
        raise ConfigError("give --bench NAME, or both --questions FILE and --answers FILE (retrieval: --captions FILE)")
    if args.max_questions and not args.bench:
        raise ConfigError("--max-questions takes the first N questions of a --bench; for your own files, give a "
                          "smaller --questions file")
    if args.model and not args.out:
        raise ConfigError("eval --model writes the model's predictions and results into a folder, never into the "
                          "model folder: give --out RUN_DIR")
    outcome = run_eval(EvalSpec(
        task=args.task, bench=args.bench, max_questions=args.max_questions, questions=args.questions,
        answers=args.answers, image_root=args.image_root, model=args.model, predictions=args.predictions,
        captions=args.captions, out=args.out, batch_size=args.batch_size, precision=args.precision,
        on_bad_record=args.on_bad_record, overwrite=args.overwrite, caption_prompt=args.caption_prompt,
        quantize=args.quantize,
        command=_eval_command(args)))
    print(outcome.table)
    r = outcome.result
    if getattr(r, "n_missing", 0):
        print(f"warning: the predictions cover only {r.n_answered} of the {r.n} scored questions; the "
              f"other {r.n_missing} count as wrong", file=sys.stderr)


def _eval_command(args) -> tuple[str, ...]:
    """The evaluation as one canonical command line (every option that applies, defaults included)."""
    argv = ["vitune", "eval"]
    for key in ("model", "predictions", "bench", "max_questions", "questions", "answers", "captions", "image_root",
                "task", "caption_prompt", "out", "batch_size", "precision", "quantize", "on_bad_record"):
        value = getattr(args, key)
        if value is not None and not (args.predictions and key in ("batch_size", "precision", "quantize", "on_bad_record")):
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return tuple(argv) + (("--overwrite",) if args.overwrite else ())


def cmd_data_shapes(args) -> None:
    from vitune.data.builtin.shapes import generate_shapes
    print(generate_shapes(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                          relational=args.relational))


def cmd_data_easy_vqa(args) -> None:
    from vitune.data.builtin.easy_vqa import convert_easy_vqa
    print(convert_easy_vqa(args.out, max_train=args.max_train, max_test=args.max_test, seed=args.seed))


def cmd_data_inspect(args) -> None:
    from vitune.inspect_data import inspect_record
    print(inspect_record(args.file, args.index, args.template, args.model, args.preset,
                         args.image_root, color=sys.stdout.isatty() and not args.no_color))


def cmd_quickstart(args) -> None:
    from vitune.quickstart import quickstart
    quickstart(Path(args.out), n_train=args.n_train, n_test=args.n_test, seed=args.seed)


def cmd_merge(args) -> None:
    from vitune.checkpoints.merge import merge_folder
    print(f"merged model saved to {merge_folder(args.model, args.out, overwrite=args.overwrite)}")


def cmd_export(args) -> None:
    from vitune.checkpoints.export_hf import export_hf
    print(f"exported to {export_hf(args.model, args.out, overwrite=args.overwrite)} (load with transformers' "
          "LlavaForConditionalGeneration / AutoProcessor)")


def cmd_convert(args) -> None:
    from vitune.checkpoints.hf_import import convert_smollm2
    print(convert_smollm2(args.cache_dir))


def cmd_data_text_chat(args) -> None:
    from vitune.inference.text_chat import write_text_chat
    print(write_text_chat(args.out, args.lm, max_new_tokens=args.max_new_tokens))


def _overwrite_arg(p) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _model_parsers(sub) -> None:
    p = sub.add_parser("merge", help="fold a model's LoRA adapters into its weights: a standalone folder")
    p.add_argument("model"), p.add_argument("out"), _overwrite_arg(p)
    p.set_defaults(fn=cmd_merge)
    p = sub.add_parser("export", help="write a model in another framework's format")
    p.add_argument("--format", choices=["hf"], required=True, help="hf: transformers' LLaVA + processor")
    p.add_argument("model"), p.add_argument("out"), _overwrite_arg(p)
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("quantize", help="weight-only int8 / int4 quantisation of the LM's linear layers and head "
                                        "(LoRA adapters kept in float beside them): a model folder for CPU inference")
    p.add_argument("model"), p.add_argument("out"), _overwrite_arg(p)
    p.add_argument("--bits", type=int, choices=[8, 4], required=True)
    p.add_argument("--group-size", type=int, choices=[32, 64, 128, 256],
                   help="--bits 4 only: inputs sharing one scale and zero (default 32)")
    p.add_argument("--merge-adapters", action="store_true",
                   help="fold LoRA adapters into the weights before quantising: a little faster, but 4-bit "
                        "rounding erases most of the tuning (the SmolLM2 base is 4-bit already)")
    p.set_defaults(fn=cmd_quantize)
    p = sub.add_parser("convert", help="convert a packaged pretrained checkpoint once (cached)")
    p.add_argument("source", choices=["smollm2"]), p.add_argument("--cache-dir")
    p.set_defaults(fn=cmd_convert)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model through the stages of a preset or config")
    p.add_argument("--preset"), p.add_argument("--config")
    p.add_argument("--data", action="append", default=[], help="FILE for every stage, or STAGE=FILE (repeatable)")
    p.add_argument("--out", required=True)
    p.add_argument("--image-root")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an OUT that holds an earlier run")
    p.add_argument("--allow-config-change", action="store_true",
                   help="--resume even though the config or data differ from the saved run's (named in the error)")
    p.add_argument("--allow-outside-images", action="store_true",
                   help="let image paths point outside the data file's folder (or --image-root)")
    p.add_argument("--on-bad-record", choices=["error", "skip"])
    p.add_argument("--stop-after", type=at_least(1), help="stop (saving the state) after this many steps in all")
    p.add_argument("overrides", nargs="*", help="config overrides: train.stages.0.steps=100 model.lm.layers=6")
    p.set_defaults(fn=cmd_train)


def _use_parsers(sub) -> None:
    positive_int, temperature, top_p = at_least(1), number_in(Range(0)), number_in(Range(0, 1, lo_open=True))

    def robust(q) -> None:
        q.add_argument("--on-bad-record", choices=["error", "skip"], default="error",
                       help="a question with a missing or corrupt image, a wrong <image> count or a too long prompt: "
                            "stop naming it (error, default) or skip it into OUT.errors.jsonl (skip)")
        q.add_argument("--overwrite", action="store_true", help="replace an existing predictions file")

    p = sub.add_parser("chat", help="ask about an image (streams); no question: interactive")
    p.add_argument("--model", required=True)
    p.add_argument("--image", action="append", default=[], help="repeatable; none: a text-only chat")
    p.add_argument("question", nargs="*")
    _quantize_arg(p)
    for q in [p]:
        q.add_argument("--max-new-tokens", type=positive_int, default=64)
        q.add_argument("--temperature", type=temperature, default=0.0)
        q.add_argument("--top-p", type=top_p, default=1.0)
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--compile", action="store_true",
                       help="decode with a torch.compile'd step of fixed shapes (needs a C++ compiler): faster "
                            "tokens after a one-off compile of tens of seconds, for long or many answers")
    p.set_defaults(fn=cmd_chat)
    p = sub.add_parser("predict", help="answer a questions JSONL file (resumes an interrupted run)")
    p.add_argument("--model", required=True), p.add_argument("--questions", required=True)
    p.add_argument("--out", required=True, help="the predictions JSONL (written as OUT.partial until done)")
    p.add_argument("--image-root")
    p.add_argument("--batch-size", type=positive_int, default=32), _precision_arg(p), robust(p)
    p.set_defaults(fn=cmd_predict)
    from vitune.evaluation.benches import BENCHES
    p = sub.add_parser("eval", help="evaluate a model (or score predictions) on a bench or a question set into a "
                                    "results folder; or compare two results folders")
    p.add_argument("--bench", choices=list(BENCHES), help="a built-in benchmark (generated once into "
                                                          "$VITUNE_CACHE/bench or ~/.cache/vitune/bench)")
    p.add_argument("--max-questions", type=positive_int, help="with --bench: only its first N questions (recorded)")
    p.add_argument("--questions"), p.add_argument("--answers")
    p.add_argument("--captions", metavar="CAPTIONS.jsonl",
                   help='retrieval on your own captions: JSONL rows {"image": PATH (relative to --image-root, default '
                        'the file\'s folder), "caption": TEXT}, several rows per image allowed; implies --task '
                        'retrieval and needs --model with an alignment head (model.contrastive.dim > 0)')
    p.add_argument("--task", choices=["vqa", "pope", "choice", "retrieval", "caption"],
                   help="how to score (default: the bench's, else vqa; choice: the option letter an answer names; "
                        "retrieval: Recall@1/5/10 image->text and text->image, multi-caption, from --bench "
                        "shapes-retrieval or --captions, its RUN_DIR gets only results.json and report.md; caption: "
                        "one caption per image of --captions (its rows the references) or --bench shapes-captions, "
                        "BLEU/METEOR/ROUGE-L/CIDEr)")
    p.add_argument("--caption-prompt", metavar="TEXT",
                   help='--task caption: the instruction asked for each caption (default: the bench\'s, else '
                        '"Describe the image."; recorded)')
    p.add_argument("--model"), p.add_argument("--predictions", help="score this predictions file instead of a model")
    p.add_argument("--out", metavar="RUN_DIR", help="the results folder: predictions.jsonl, scores.jsonl, "
                                                    "results.json, report.md, plots (needed with --model)")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="compare two results folders of the same questions: table and significance")
    p.add_argument("--image-root"), p.add_argument("--batch-size", type=positive_int, default=32), _precision_arg(p)
    p.add_argument("--on-bad-record", choices=["error", "skip"], default="error",
                   help="a question with a missing or corrupt image, a wrong <image> count or a too long prompt: "
                        "stop naming it (error, default) or skip it into RUN_DIR/predictions.jsonl.errors.jsonl (skip)")
    p.add_argument("--overwrite", action="store_true", help="replace the results in a non-empty --out folder")
    p.set_defaults(fn=cmd_eval)


def _precision_arg(p) -> None:
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: matmuls under bf16 autocast, faster on CPUs with bf16 units (default fp32)")
    _quantize_arg(p)


def _quantize_arg(p) -> None:
    p.add_argument("--quantize", type=int, choices=[8, 4],
                   help="quantise the LM's weights on load: int8 per channel or int4 in groups of 32 (weight-only; "
                        "a folder from `vitune quantize` is used as stored)")


def _data_parsers(sub) -> None:
    d = sub.add_parser("data", help="built-in data sets and data inspection").add_subparsers(dest="data_cmd", required=True)
    p = d.add_parser("shapes", help="generate the synthetic shapes scenes data set")
    p.add_argument("--out", required=True), p.add_argument("--n-train", type=at_least(1), default=4000)
    p.add_argument("--n-test", type=at_least(1), default=500), p.add_argument("--seed", type=at_least(0), default=0)
    p.add_argument("--no-relational", dest="relational", action="store_false",
                   help="without the relational questions (closest / furthest / same): the data set as before them")
    p.set_defaults(fn=cmd_data_shapes)
    p = d.add_parser("easy-vqa", help="convert the packaged easy-VQA data set")
    p.add_argument("--out", required=True), p.add_argument("--max-train", type=at_least(1))
    p.add_argument("--max-test", type=at_least(1)), p.add_argument("--seed", type=at_least(0), default=0)
    p.set_defaults(fn=cmd_data_easy_vqa)
    p = d.add_parser("text-chat", help="text-only chats: a pretrained LM's own answers to built-in prompts")
    p.add_argument("--out", required=True), p.add_argument("--lm", default="smollm2-135m-instruct")
    p.add_argument("--max-new-tokens", type=at_least(1), default=96)
    p.set_defaults(fn=cmd_data_text_chat)
    p = d.add_parser("inspect", help="show a rendered record: trained tokens highlighted, masked ones dim")
    p.add_argument("file"), p.add_argument("--index", type=at_least(0), default=0)
    p.add_argument("--template", choices=["plain", "chatml"], default="chatml")
    p.add_argument("--model", help="use this model's tokenizer"), p.add_argument("--preset", default="small")
    p.add_argument("--image-root"), p.add_argument("--no-color", action="store_true")
    p.set_defaults(fn=cmd_data_inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitune", description="visual instruction tuning")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _data_parsers(sub)
    _train_parser(sub)
    _use_parsers(sub)
    _model_parsers(sub)
    add_serve_parser(sub)
    p = sub.add_parser("quickstart", help="generate shapes data, train `small`, evaluate, print the table")
    p.add_argument("--out", default="runs/quickstart"), p.add_argument("--n-train", type=at_least(1), default=4000)
    p.add_argument("--n-test", type=at_least(1), default=500), p.add_argument("--seed", type=at_least(0), default=0)
    p.set_defaults(fn=cmd_quickstart)
    return parser


ISSUES_URL = "https://github.com/vitune/vitune/issues"


def _os_message(e: OSError) -> str:
    """`[Errno 21] Is a directory: 'x'` -> `x: is a directory`."""
    if e.filename is None:
        return str(e)
    what = (e.strerror or str(e)).lower()
    return f"{e.filename}: {what}" + (f" (-> {e.filename2})" if e.filename2 else "")


def _report(cmd: str, e: BaseException, debug: bool) -> int:
    """The one error path: expected failures name what is wrong (exit 2); anything else is a bug."""
    if debug:
        traceback.print_exc()
    if isinstance(e, Interrupted):
        print(f"vitune {cmd}: {e}", file=sys.stderr)
        return e.exit_code
    if isinstance(e, (ConfigError, DataError, TrainingError)):
        msg = str(e)
    elif isinstance(e, OSError):
        msg = _os_message(e)
    elif isinstance(e, ValueError):
        msg = str(e)
    elif isinstance(e, KeyboardInterrupt):
        print(f"vitune {cmd}: interrupted", file=sys.stderr)
        return 130
    else:
        print(f"vitune {cmd}: internal error: {type(e).__name__}: {e}\nThis is a bug in vitune. Please report it "
              f"at {ISSUES_URL} with the command; rerun with --debug (or VITUNE_DEBUG=1) for the traceback.",
              file=sys.stderr)
        return 1
    print(f"vitune {cmd}: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("VITUNE_DEBUG", "") not in ("", "0")
    try:
        args.fn(args)
    except BaseException as e:  # noqa: BLE001 - every failure leaves through _report
        if isinstance(e, SystemExit):
            raise
        return _report(args.cmd, e, debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
