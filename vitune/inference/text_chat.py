"""Text-only chats that keep a pretrained LM's language ability while it learns to see.

Mixed into an instruction stage (`StageConfig.mix_data`), these records stop the LM from
forgetting how to chat when it is tuned on short visual answers. They are made by
**self-distillation**: the prompts below are vitune's own (general knowledge, explanations, short
writing tasks), and each answer is the pretrained LM's own greedy reply, rendered with the same
chat template and system prompt as training. Training on them pulls the model back towards its
original behaviour, never towards new facts; nothing is downloaded and nothing is made up here.
Replies that do not finish within `max_new_tokens` are dropped (a cut-off reply would teach
stopping mid-sentence).

    vitune data text-chat --out DIR [--lm smollm2-135m-instruct]   -> DIR/text_chat.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vitune.files import atomic_write_json

PROMPTS = (
    "What is the capital of France?", "What is the capital of Japan?", "What is the capital of Italy?",
    "What is the capital of Canada?", "What is the capital of Egypt?", "What is the capital of Spain?",
    "What is the largest planet in our solar system?", "What is the closest star to the Earth?",
    "Why is the sky blue? Answer in one sentence.", "What do plants need to grow?",
    "What is photosynthesis? Explain briefly.", "What is water made of?", "At what temperature does water boil?",
    "What is the boiling point of water in Fahrenheit?", "How many days are there in a week?",
    "How many months are there in a year?", "How many hours are in a day?", "What is the opposite of hot?",
    "What is the opposite of big?", "Name three primary colors.", "Name three fruits.", "Name three animals that live in the sea.",
    "Name a musical instrument with strings.", "What color do you get when you mix blue and yellow?",
    "What color do you get when you mix red and white?", "What shape has three sides?", "What shape has four equal sides?",
    "How many sides does a hexagon have?", "What is a circle?", "What is a rectangle?", "What is 2 plus 2?",
    "What is 10 minus 3?", "What is half of 10?", "Is a tomato a fruit or a vegetable?", "What do bees make?",
    "What do cows drink?", "Which animal is known as the king of the jungle?", "What is the fastest land animal?",
    "What is the tallest animal in the world?", "Why do we need to sleep? Answer in one sentence.",
    "Why is exercise good for you? Answer briefly.", "What is a healthy breakfast?", "Give me a tip for staying focused.",
    "Give me one tip for learning a new language.", "How do I make a cup of tea?", "How do you boil an egg?",
    "What should I pack for a day at the beach?", "Suggest a name for a pet cat.", "Suggest a name for a small bakery.",
    "Write a short sentence about the sea.", "Write a haiku about autumn.", "Write one sentence about the moon.",
    "Write a short greeting for a birthday card.", "Describe a sunny day in one sentence.", "What is a noun?",
    "What is a verb?", "What is the plural of mouse?", "What is a synonym for happy?", "What is an antonym for fast?",
    "Translate 'hello' into French.", "Translate 'thank you' into Spanish.", "What language is spoken in Brazil?",
    "Who wrote Romeo and Juliet?", "Who painted the Mona Lisa?", "Who was the first person to walk on the moon?",
    "What is the largest ocean on Earth?", "What is the longest river in the world?", "What is the highest mountain in the world?",
    "What continent is Kenya in?", "How many continents are there?", "What is gravity? Explain briefly.",
    "What is electricity? Explain briefly.", "What is a computer?", "What is the internet?", "What is an atom?",
    "What gas do humans breathe in to live?", "What gas do plants take in?", "Why do leaves change color in autumn?",
    "What is the main ingredient in bread?", "What is cheese made from?", "What is the freezing point of water?",
    "What is ice?", "What is a rainbow?", "What causes rain?", "What is the sun?", "What is the moon?",
    "Hello! How are you?", "Can you help me with my homework?", "Thank you for your help!",
    "Tell me a fun fact about octopuses.", "Tell me a fun fact about space.", "What is a good way to save money?",
    "What is the difference between weather and climate?", "What is a triangle?", "How many legs does a dog have?",
    "How many wheels does a bicycle have?", "What do you call a baby cat?", "What do you call a baby dog?",
)
DEFAULT_FILE = "text_chat.json"


@dataclass(frozen=True)
class TextChatSummary:
    path: Path
    n_prompts: int
    n_records: int
    n_unfinished: int


def _text_only_assistant(lm_source: str, system_prompt: str):
    """An Assistant around the pretrained LM; its (smallest, random) vision tower is never used."""
    from vitune.checkpoints.pretrained import build_vlm, pretrained_tokenizer
    from vitune.config import ModelConfig, VisionConfig
    from vitune.inference.assistant import Assistant

    cfg = ModelConfig(lm_pretrained=lm_source, system_prompt=system_prompt,
                      vision=VisionConfig(kind="cnn", image_size=16, patch_size=8, width=16))
    tok = pretrained_tokenizer(cfg)
    return Assistant(build_vlm(cfg, tok.special.image).eval(), tok)


def self_distill(lm_source: str, prompts: tuple[str, ...] = PROMPTS, system_prompt: str | None = None,
                 max_new_tokens: int = 96, batch_size: int = 16) -> tuple[list[dict], int]:
    """LLaVA text-only records `{"id", "conversations"}` with the LM's greedy replies; (records, unfinished)."""
    from vitune.data.chat import Message
    from vitune.inference.assistant import Request
    from vitune.inference.generate import GenerationConfig, generate
    from vitune.presets import SMOLLM2_SYSTEM

    a = _text_only_assistant(lm_source, SMOLLM2_SYSTEM if system_prompt is None else system_prompt)
    gen, stops = GenerationConfig(max_new_tokens=max_new_tokens), {a.tok.special.im_end, a.tok.special.eos}
    records, unfinished = [], 0
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids = [a.prompt_ids(Request([], [Message("user", p)]), max_new_tokens) for p in chunk]
        out = generate(a.model, ids, None, gen, stops, a.tok.decode, a.tok.special.eos)
        for k, (prompt, reply, toks) in enumerate(zip(chunk, out.texts, out.token_ids)):
            if len(toks) >= max_new_tokens or not reply.strip():
                unfinished += 1
                continue
            records.append({"id": f"text-chat-{i + k:04d}", "conversations": [
                {"from": "human", "value": prompt}, {"from": "gpt", "value": reply.strip()}]})
    return records, unfinished


def write_text_chat(out_dir: str | Path, lm_source: str = "smollm2-135m-instruct",
                    max_new_tokens: int = 96) -> TextChatSummary:
    records, unfinished = self_distill(lm_source, max_new_tokens=max_new_tokens)
    path = Path(out_dir) / DEFAULT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, records)
    return TextChatSummary(path, len(PROMPTS), len(records), unfinished)
