"""``accelerate launch`` with the shipped config starts docs/scaling_out.md's FSDP example on 2 ranks (CPU, gloo).

The example script is taken from the document as written and run on a 2-layer Llama-shaped checkpoint with a word
tokenizer, through a wrapper that records each process's rank and world size before it runs the script.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = """import json, os, runpy, sys
from pathlib import Path
Path(sys.argv[1], "rank" + os.environ["RANK"] + ".json").write_text(json.dumps(
    {name: os.environ[name] for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}))
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _documented_script() -> str:
    """The ``unlearn_llama.py`` block of docs/scaling_out.md."""
    text = (ROOT / "docs" / "scaling_out.md").read_text(encoding="utf-8")
    start = text.index("```python\n", text.index("`unlearn_llama.py` (run with")) + len("```python\n")
    return text[start : text.index("```\n", start)]


def _checkpoint(folder: Path) -> None:
    """A 2-layer Llama-shaped causal LM and a word-level tokenizer of the script's sentences, saved as one folder."""
    words = "Who wrote the secret diary? Ada Quill it in 1931. What is capital of France Paris.".split()
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *dict.fromkeys(words)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)


@pytest.mark.slow
@pytest.mark.distributed
def test_accelerate_launch_runs_the_fsdp_example_on_two_ranks(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "checkpoint")
    (tmp_path / "unlearn_llama.py").write_text(_documented_script(), encoding="utf-8")
    (tmp_path / "wrapper.py").write_text(WRAPPER, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "examples" / "accelerate_launch.yaml"), "--main_process_port", "0",
               "wrapper.py", str(tmp_path), "unlearn_llama.py", str(tmp_path / "checkpoint")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["RANK"], r["WORLD_SIZE"]) for r in ranks] == [("0", "2"), ("1", "2")]
    (result,) = [line for line in done.stdout.splitlines() if line.startswith("max_epochs ")]  # rank 0 prints
    last = ast.literal_eval(result.removeprefix("max_epochs "))
    assert last["step"] == 3 and last["engine_ghost"] == 1.0  # the whole budget, on the ghost engine
