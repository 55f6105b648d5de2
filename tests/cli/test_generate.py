"""``train.py generate``: sampling from a checkpoint with temperature, top-k, a token budget and stop at EOS."""

from __future__ import annotations

import pytest

from lit_overtok.cli.main import main as cli_main
from lit_overtok.evaluation.tokenizers import GrammarTokenizer

CFG3F = GrammarTokenizer("cfg3f")  # the spelling of the runs' grammar: ^ BOS, 1-3 terminals, $ EOS, _ and |


def generate(args: list[str], capsys) -> list[str]:
    capsys.readouterr()  # not what trained the checkpoint, when this test trained it
    cli_main(["generate", *args])
    return capsys.readouterr().out.splitlines()


def test_samples_stop_at_eos_and_respect_the_token_budget(trained_checkpoint, capsys):
    checkpoint = str(trained_checkpoint("dense"))
    samples = generate(["--checkpoint", checkpoint, "--num-samples", "6", "--max-new-tokens", "12", "--seed", "1"],
                       capsys)
    assert len(samples) == 6 and len(set(samples)) > 1  # sampled (temperature 1), not six copies
    for sample in samples:
        assert sample.startswith("^") and set(sample) <= set(CFG3F.chars)
        assert len(sample) <= 1 + 12
        assert "$" not in sample[:-1]  # nothing after the end of text
    budget = generate(["--checkpoint", checkpoint, "--num-samples", "3", "--max-new-tokens", "7", "--no-stop-at-eos"],
                      capsys)
    assert [len(sample) for sample in budget] == [8, 8, 8]
    again = generate(["--checkpoint", checkpoint, "--num-samples", "6", "--max-new-tokens", "12", "--seed", "1"], capsys)
    assert again == samples  # seeded


def test_greedy_equals_top_1_and_continues_the_prompt(trained_checkpoint, capsys):
    checkpoint = str(trained_checkpoint("oe"))
    greedy = generate(["--checkpoint", checkpoint, "--prompt", "^31", "--temperature", "0", "--num-samples", "2",
                       "--max-new-tokens", "10"], capsys)
    top1 = generate(["--checkpoint", checkpoint, "--prompt", "^31", "--top-k", "1", "--num-samples", "2",
                     "--max-new-tokens", "10", "--seed", "5"], capsys)
    assert greedy == top1 and greedy[0] == greedy[1] and greedy[0].startswith("^31")


def test_a_prompt_the_tokenizer_cannot_spell_is_one_line(trained_checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", "--checkpoint", str(trained_checkpoint("dense")), "--prompt", "hello"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "'h'" in err
