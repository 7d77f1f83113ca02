"""RewardBench 2 scoring: the strict rule (Ties included), and the heads of a basis on a tiny model."""

import json

import pytest
import torch

from helpers import tiny_spec
from lore_pl.data.basis_file import BasisFile, save_basis
from lore_pl.experiments.rewardbench import correct, evaluate_rewardbench, subset_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_strict_rule_every_chosen_above_every_rejected():
    rewards = torch.tensor([[3.0], [1.0], [2.0], [0.0], [2.0], [2.0]])
    table = {
        "subset": ["Factuality", "Ties", "Ties"],
        "chosen": [[0], [0, 2], [4]],     # 3 ; 3 and 2 ; 2
        "rejected": [[1, 3], [1, 3], [5]],  # 1, 0 ; 1, 0 ; 2 (a tie)
    }
    assert correct(rewards, table)[:, 0].tolist() == [True, True, False]  # a tie is not a win
    table["rejected"][1] = [1, 4]  # now a rejected (2) equals the lower chosen (2): the Ties example fails
    assert correct(rewards, table)[:, 0].tolist() == [True, False, False]
    acc = subset_accuracy(rewards, table, torch.ones(1, 1))
    assert acc["Factuality"].item() == 1.0 and acc["Ties"].item() == 0.0 and acc["mean"].item() == 0.5


def test_reference_head_and_basis_heads_on_a_tiny_reward_model(tmp_path, tiny_reward_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    examples = [
        {"id": "1", "prompt": "what is the capital of france", "chosen": ["paris"], "rejected": ["rain", "tea", "dogs"],
         "subset": "Factuality", "num_correct": 1},
        {"id": "2", "prompt": "one two three", "chosen": ["four", "four five"], "rejected": ["no", "cats"],
         "subset": "Ties", "num_correct": 2},
        {"id": "3", "prompt": "hello", "chosen": ["hello world"], "rejected": ["bad", "worst", "no"],
         "subset": "Focus", "num_correct": 1},
        {"id": "4", "prompt": "tea or coffee", "chosen": ["coffee please"], "rejected": ["tea", "water", "bread"],
         "subset": "Focus", "num_correct": 1},
    ]
    (tmp_path / "rb2.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    basis = torch.randn(16, 2)
    save_basis(tmp_path / "basis.safetensors", BasisFile(basis, 100.0, None, ["u1"], torch.tensor([[0.25, 0.75]])))
    scores = evaluate_rewardbench(str(tmp_path / "basis.safetensors"), ["u1"], source=str(tmp_path / "rb2.jsonl"),
                                  embedder=tiny_spec(tiny_reward_model), cache_dir=str(tmp_path / "cache"),
                                  output=str(tmp_path / "scores.json"), progress=False)
    assert set(scores) == {"reference", "basis/0", "basis/1", "user/u1"}
    assert json.loads((tmp_path / "scores.json").read_text()) == scores

    # the reference head's accuracy is the reward model's own: recompute it from the model's logits
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model)

    def score(prompt, response):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
        with torch.no_grad():
            return model(**tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits[0, 0].item()

    hits = {}
    for e in examples:
        ok = min(score(e["prompt"], c) for c in e["chosen"]) > max(score(e["prompt"], r) for r in e["rejected"])
        hits.setdefault(e["subset"], []).append(ok)
    for subset, values in hits.items():
        assert scores["reference"][subset] == pytest.approx(sum(values) / len(values))
    assert scores["reference"]["mean"] == pytest.approx(sum(sum(v) / len(v) for v in hits.values()) / len(hits))
