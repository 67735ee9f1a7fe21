"""The `vitune` command: parse arguments, call the library. No logic of its own.

    vitune data shapes|easy-vqa|inspect ...   vitune train ...   vitune chat ...
    vitune predict ...   vitune eval ...   vitune quickstart
    vitune merge MODEL OUT   vitune export --format hf MODEL OUT   vitune convert smollm2
Run `vitune COMMAND --help` for each command's options.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from vitune.config import ConfigError, apply_overrides, load_yaml
from vitune.files import DataError


def _config(args):
    from vitune.presets import preset
    if bool(args.preset) == bool(args.config):
        raise ConfigError("give exactly one of --preset NAME or --config FILE.yaml")
    cfg = preset(args.preset) if args.preset else load_yaml(args.config)
    if args.on_bad_record:
        args.overrides.append(f"train.on_bad_record={args.on_bad_record}")
    return apply_overrides(cfg, args.overrides)


def _data_map(items: list[str]) -> dict[str, str]:
    """`--data FILE` (every stage) or `--data STAGE=FILE`."""
    out: dict[str, str] = {}
    for item in items:
        stage, sep, path = item.partition("=")
        if sep and not Path(item).exists():
            out[stage] = path
        else:
            out["*"] = item
    return out


def cmd_train(args) -> None:
    from vitune.training.train import train
    cfg = _config(args)
    data = _data_map(args.data)
    per_stage = {s.name: data.get(s.name) or data.get("*") or s.data for s in cfg.train.stages}
    folder = train(cfg, per_stage, args.out, resume=args.resume, image_root=args.image_root,
                   stop_after=args.stop_after)
    print(f"model saved to {folder}\nchat with it:  vitune chat --model {folder} --image IMAGE \"question\"")


def _gen(args):
    from vitune.inference.generate import GenerationConfig
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)


def _printer():
    """Print streamed text as it comes, without the leading space a tokenizer may put first."""
    started = False

    def show(text: str) -> None:
        nonlocal started
        text = text if started else text.lstrip()
        started = started or bool(text)
        print(text, end="", flush=True)
    return show


def cmd_chat(args) -> None:
    from vitune.data.chat import Message
    from vitune.data.processor import load_image
    from vitune.inference.assistant import Assistant, Request, user_turn
    assistant = Assistant.load(args.model)
    images = [load_image(p) for p in args.image]
    messages: list[Message] = []
    question = " ".join(args.question)
    while True:
        if not question:
            try:
                question = input("you> ").strip()
            except EOFError:
                return
            if question in ("", "exit", "quit"):
                return
        messages.append(user_turn(question, len(images)) if not messages else Message("user", question))
        reply = assistant.answer(Request(images, messages), _gen(args), on_text=_printer())
        print()
        messages.append(Message("assistant", reply))
        if args.question:
            return
        question = ""


def cmd_predict(args) -> None:
    from vitune.evaluation.runner import run_predict
    n = run_predict(args.model, args.questions, args.out, args.image_root, args.batch_size, precision=args.precision)
    print(f"wrote {n} predictions to {args.out}")


def cmd_eval(args) -> None:
    from vitune.data.vqa_format import read_predictions
    from vitune.evaluation.metrics import format_table
    from vitune.evaluation.runner import TASKS, run_predict
    from vitune.files import atomic_write_json
    if bool(args.model) == bool(args.predictions):
        raise ConfigError("give exactly one of --model DIR or --predictions FILE")
    preds_path = args.predictions
    if args.model:
        preds_path = args.out_predictions or str(Path(args.model) / "predictions.jsonl")
        run_predict(args.model, args.questions, preds_path, args.image_root, args.batch_size, precision=args.precision)
    result = TASKS[args.task](args.questions, args.answers, read_predictions(preds_path))
    print(format_table(result))
    if args.out:
        atomic_write_json(args.out, dataclasses.asdict(result))


def cmd_data_shapes(args) -> None:
    from vitune.data.builtin.shapes import generate_shapes
    print(generate_shapes(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed))


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
    print(f"merged model saved to {merge_folder(args.model, args.out)}")


def cmd_export(args) -> None:
    from vitune.checkpoints.export_hf import export_hf
    print(f"exported to {export_hf(args.model, args.out)} (load with transformers' "
          "LlavaForConditionalGeneration / AutoProcessor)")


def cmd_convert(args) -> None:
    from vitune.checkpoints.hf_import import convert_smollm2
    print(convert_smollm2(args.cache_dir))


def cmd_data_text_chat(args) -> None:
    from vitune.inference.text_chat import write_text_chat
    print(write_text_chat(args.out, args.lm, max_new_tokens=args.max_new_tokens))


def _model_parsers(sub) -> None:
    p = sub.add_parser("merge", help="fold a model's LoRA adapters into its weights: a standalone folder")
    p.add_argument("model"), p.add_argument("out")
    p.set_defaults(fn=cmd_merge)
    p = sub.add_parser("export", help="write a model in another framework's format")
    p.add_argument("--format", choices=["hf"], required=True, help="hf: transformers' LLaVA + processor")
    p.add_argument("model"), p.add_argument("out")
    p.set_defaults(fn=cmd_export)
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
    p.add_argument("--on-bad-record", choices=["error", "skip"])
    p.add_argument("--stop-after", type=int, help="stop (saving the state) after this many steps in all")
    p.add_argument("overrides", nargs="*", help="config overrides: train.stages.0.steps=100 model.lm.layers=6")
    p.set_defaults(fn=cmd_train)


def _use_parsers(sub) -> None:
    p = sub.add_parser("chat", help="ask about an image (streams); no question: interactive")
    p.add_argument("--model", required=True)
    p.add_argument("--image", action="append", default=[], help="repeatable; none: a text-only chat")
    p.add_argument("question", nargs="*")
    for q in [p]:
        q.add_argument("--max-new-tokens", type=int, default=64)
        q.add_argument("--temperature", type=float, default=0.0)
        q.add_argument("--top-p", type=float, default=1.0)
        q.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_chat)
    p = sub.add_parser("predict", help="answer a questions JSONL file")
    p.add_argument("--model", required=True), p.add_argument("--questions", required=True)
    p.add_argument("--out", required=True), p.add_argument("--image-root")
    p.add_argument("--batch-size", type=int, default=32), _precision_arg(p)
    p.set_defaults(fn=cmd_predict)
    p = sub.add_parser("eval", help="score predictions (or a model) on a task")
    p.add_argument("--task", choices=["vqa"], default="vqa")
    p.add_argument("--questions", required=True), p.add_argument("--answers", required=True)
    p.add_argument("--model"), p.add_argument("--predictions")
    p.add_argument("--out", help="write the scores as JSON"), p.add_argument("--out-predictions")
    p.add_argument("--image-root"), p.add_argument("--batch-size", type=int, default=32), _precision_arg(p)
    p.set_defaults(fn=cmd_eval)


def _precision_arg(p) -> None:
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: matmuls under bf16 autocast, faster on CPUs with bf16 units (default fp32)")


def _data_parsers(sub) -> None:
    d = sub.add_parser("data", help="built-in data sets and data inspection").add_subparsers(dest="data_cmd", required=True)
    p = d.add_parser("shapes", help="generate the synthetic shapes scenes data set")
    p.add_argument("--out", required=True), p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=500), p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_data_shapes)
    p = d.add_parser("easy-vqa", help="convert the packaged easy-VQA data set")
    p.add_argument("--out", required=True), p.add_argument("--max-train", type=int)
    p.add_argument("--max-test", type=int), p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_data_easy_vqa)
    p = d.add_parser("text-chat", help="text-only chats: a pretrained LM's own answers to built-in prompts")
    p.add_argument("--out", required=True), p.add_argument("--lm", default="smollm2-135m-instruct")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.set_defaults(fn=cmd_data_text_chat)
    p = d.add_parser("inspect", help="show a rendered record: trained tokens highlighted, masked ones dim")
    p.add_argument("file"), p.add_argument("--index", type=int, default=0)
    p.add_argument("--template", choices=["plain", "chatml"], default="chatml")
    p.add_argument("--model", help="use this model's tokenizer"), p.add_argument("--preset", default="small")
    p.add_argument("--image-root"), p.add_argument("--no-color", action="store_true")
    p.set_defaults(fn=cmd_data_inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitune", description="visual instruction tuning")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _data_parsers(sub)
    _train_parser(sub)
    _use_parsers(sub)
    _model_parsers(sub)
    p = sub.add_parser("quickstart", help="generate shapes data, train `small`, evaluate, print the table")
    p.add_argument("--out", default="runs/quickstart"), p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=500), p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (ConfigError, DataError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"vitune {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
