"""Launcher smoke test: the README's main command, ``deepspeed --num_gpus 2 examples/train.py --deepspeed_config
ds_configs/cpu_tiny.json`` (2 CPU ranks, ep=2, ZeRO-2), run from an empty folder, trains with a falling loss,
writes its metrics CSV and a final checkpoint under ``out/cpu_tiny/`` (the README names it) and its metrics
JSON, keeps DeepSpeed's per-rank chatter out of the output; ``--resume`` continues from that checkpoint at the
right step. The pipeline config and ``--hf-model`` (a Hugging Face model with its tokenizer) train too."""
import json
import os
import subprocess
import sys
import time

from piper_ds.testing import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*extra, cwd, config="ds_configs/cpu_tiny.json", timeout=170):
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), os.path.join(ROOT, "examples", "train.py"),
           "--deepspeed_config", os.path.join(ROOT, config), *extra]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr, time.monotonic() - start


def test_readme_main_command_trains_with_falling_loss_and_resumes(tmp_path):
    metrics, ckpt, csv = tmp_path / "metrics.json", tmp_path / "out" / "cpu_tiny" / "checkpoints", \
        tmp_path / "out" / "cpu_tiny" / "metrics"
    out, seconds = _launch("--metrics-out", str(metrics), cwd=tmp_path)
    m = json.loads(metrics.read_text())
    print(f"main command: {seconds:.0f} s, loss {m['first_loss']:.3f} -> {m['final_loss']:.3f}", file=sys.stderr)
    assert m["steps"] == 100 and m["world_size"] == 2
    assert m["final_loss"] < m["first_loss"] - 1.5, (m["first_loss"], m["final_loss"])
    assert m["final_val_loss"] < m["first_loss"] - 1.5
    for key in ("median_step_time_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu_pct", "peak_memory_gb"):
        assert m[key] > 0, key
    lines = [line for line in out.splitlines() if "MFU" in line and "loss" in line]
    assert len(lines) >= 10, out[-3000:]  # step 1, every steps_per_print (10), the last
    for field in ("aux", "gnorm", "skipped 0", "lr", "tok/s", "/gpu", "TFLOP/s/gpu", "mem", "load max/mean",
                  "dropped"):
        assert field in lines[-1], (field, lines[-1])
    assert "validation loss" in out
    for chatter in ("built successfully", "No existing process group found", "before it has started"):
        assert chatter not in out, chatter  # DeepSpeed's per-rank lines are quieted
    assert (ckpt / "latest").read_text().strip() == "global_step100"
    assert len(list((ckpt / "global_step100").glob("layer_*_expert_*_model_states.pt"))) == 2 * 4  # 2 MoE layers
    assert (ckpt / "global_step100" / "piper_manifest.json").is_file()
    rows = (csv / "Train_Samples_loss.csv").read_text().strip().splitlines()
    assert rows[0] == "step,loss" and len(rows) >= 11, rows[:3]
    assert (csv / "Train_Samples_skipped_steps.csv").is_file()

    resumed = tmp_path / "resumed.json"
    out, _ = _launch("--metrics-out", str(resumed), "--resume", "--steps", "105", cwd=tmp_path)
    assert f"loaded checkpoint {os.path.join('out', 'cpu_tiny', 'checkpoints', 'global_step100')} (step 100)" in out
    r = json.loads(resumed.read_text())
    assert r["steps"] == 105 and r["history"][0]["step"] == 101
    assert r["first_loss"] < m["first_loss"] - 1.5  # it continued from the trained weights


def test_pipeline_config_trains_with_falling_loss(tmp_path):
    """``ds_configs/cpu_tiny_pipeline.json``: pp = 2 on 2 CPU ranks, the 1F1B pipeline engine, train_batch."""
    metrics, ckpt = tmp_path / "metrics.json", tmp_path / "ckpt"
    out, _ = _launch("--steps", "30", "--metrics-out", str(metrics), "--save-dir", str(ckpt),
                     config="ds_configs/cpu_tiny_pipeline.json", timeout=240, cwd=tmp_path)
    m = json.loads(metrics.read_text())
    assert m["steps"] == 30 and m["world_size"] == 2
    assert m["final_loss"] < m["first_loss"] - 1.5, (m["first_loss"], m["final_loss"])
    assert m["final_val_loss"] < m["first_loss"] - 1.5
    lines = [line for line in out.splitlines() if "MFU" in line and "loss" in line]
    for missing in ("aux n/a", "load max/mean n/a", "dropped n/a"):  # reported as at pp = 1
        assert missing not in lines[-1], lines[-1]
    assert "aux 0.0" in lines[-1] and "validation loss" in out
    m_aux = [h["aux_loss"] for h in m["history"] if "aux_loss" in h]
    assert m_aux and all(0 < a < 0.1 for a in m_aux), m_aux
    assert (ckpt / "latest").read_text().strip() == "global_step30"


def _tiny_hf_model(folder):
    """A tiny Qwen2-MoE (gated shared expert, load-balancing loss) with its own byte-level BPE tokenizer trained
    on two standard library modules, saved as a Hugging Face model directory; returns (model dir, corpus file)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2MoeConfig
    text = "".join(open(os.path.join(os.path.dirname(os.__file__), name)).read()
                   for name in ("argparse.py", "textwrap.py"))
    corpus = folder / "corpus.txt"
    corpus.write_text(text)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=512,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    config = Qwen2MoeConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                            shared_expert_intermediate_size=64, intermediate_size=128, max_position_embeddings=128)
    torch.manual_seed(0)
    model_dir = folder / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(str(model_dir))
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(str(model_dir))
    return model_dir, corpus


def test_hf_model_trains_with_its_tokenizer_and_exports(tmp_path):
    """``--hf-model``: ds_configs/cpu_tiny_hf.json (ep = 2, ZeRO-2) trains a Hugging Face model on a text file with
    its own tokenizer, with the reference model's metrics, DeepSpeed checkpoint (experts per file) and validation,
    and ``--hf-export`` writes a model and tokenizer that transformers loads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir, corpus = _tiny_hf_model(tmp_path)
    metrics, ckpt, export = tmp_path / "metrics.json", tmp_path / "ckpt", tmp_path / "export"
    out, _ = _launch("--hf-model", str(model_dir), "--data", str(corpus), "--seq-len", "64", "--steps", "30",
                     "--metrics-out", str(metrics), "--save-dir", str(ckpt), "--hf-export", str(export),
                     cwd=tmp_path, config="ds_configs/cpu_tiny_hf.json")
    m = json.loads(metrics.read_text())
    assert m["steps"] == 30 and m["world_size"] == 2 and m["hf_model"] == str(model_dir)
    assert m["final_loss"] < m["first_loss"] - 0.5, (m["first_loss"], m["final_loss"])
    for key in ("median_step_time_s", "tokens_per_s_per_gpu", "tflops_per_gpu", "mfu_pct", "peak_memory_gb"):
        assert m[key] > 0, key
    assert all(h["aux_loss"] > 0 for h in m["history"] if "loss" in h)  # the model's own load-balancing loss
    assert "validation loss" in out
    assert len(list((ckpt / "global_step30").glob("layer_*_expert_*_model_states.pt"))) == 2 * 4
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    model = AutoModelForCausalLM.from_pretrained(str(export))
    ids = tokenizer("def main():\n    return 0\n", return_tensors="pt")["input_ids"]
    before = AutoModelForCausalLM.from_pretrained(str(model_dir))
    trained, initial = model(input_ids=ids).logits, before(input_ids=ids).logits
    assert trained.shape == (1, ids.shape[1], 512) and not torch.allclose(trained, initial)  # the trained weights
