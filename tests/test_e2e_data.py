"""E2E-QP data: pretraining packing (text / jsonl / parquet / safetensors), instruction formats with
loss on target tokens only, collation, held-out split, and a clear error for unreachable dataset names."""
import json

import pytest
import torch

from effqat_plugin.data import save_token_file
from effqat_plugin.e2e_data import (IGNORE_INDEX, TokenDataset, collate, default_val_samples, instruction_pair,
                                    load_e2e_data, pack_texts, tokenize_instruction)


@pytest.fixture(scope="module")
def tok(stories260k_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(stories260k_dir))


def words(ids):
    return " ".join(f"t{i}" for i in ids)


def test_pretrain_packing_concatenates_documents_into_fixed_rows(tok, tmp_path):
    docs = [words(range(3, 13)), words(range(20, 27)), words(range(30, 41))]  # 10 + 7 + 11 words
    ds = pack_texts(docs, tok, seq_len=8)
    stream = torch.cat([torch.tensor(tok(d)["input_ids"]) for d in docs])
    assert len(ds) == stream.numel() // 8
    assert torch.equal(ds.input_ids.reshape(-1), stream[: len(ds) * 8])
    item = ds[1]
    assert torch.equal(item["labels"], item["input_ids"])  # loss on every token
    # the same rows from .txt, .jsonl and .parquet files; .safetensors input_ids re-cut to seq_len
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.parquet"):
        got = load_e2e_data(str(tmp_path / name), tok, "pretrain", seq_len=8)
        assert torch.equal(got.input_ids, ds.input_ids), name
    (tmp_path / "a.txt").write_text(" ".join(docs))
    txt = load_e2e_data(str(tmp_path / "a.txt"), tok, "pretrain", seq_len=8)
    assert txt.input_ids.shape[1] == 8 and len(txt) == 28 // 8
    save_token_file(str(tmp_path / "ids.safetensors"), torch.arange(40).view(4, 10))
    st = load_e2e_data(str(tmp_path / "ids.safetensors"), None, "pretrain", seq_len=8)
    assert torch.equal(st.input_ids.reshape(-1), torch.arange(40))
    assert load_e2e_data(str(tmp_path / "ids.safetensors"), None, "pretrain", seq_len=8, n_samples=2).input_ids.shape == (2, 8)


def test_instruction_labels_mask_source_and_padding(tok):
    pairs = [(words([5, 6, 7]), words([8, 9])), (words([10]), words([11, 12, 13, 14]))]
    ds = tokenize_instruction(pairs, tok, source_len=384, target_len=128)
    ex = ds[0]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert ex["input_ids"].tolist() == [bos, 5, 6, 7, 8, 9, eos]
    assert ex["labels"].tolist() == [IGNORE_INDEX] * 4 + [8, 9, eos]
    batch = collate([ds[0], ds[1]], pad_token_id=0)
    assert batch["input_ids"].shape == (2, 7)
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 2 + [11, 12, 13, 14, eos]
    assert "attention_mask" not in batch  # equal lengths: nothing padded, no mask
    short = collate([ds[1], TokenDataset([torch.tensor([1, 3])], [torch.tensor([-100, 3])])[0]], 0)
    assert short["labels"][1].tolist() == [IGNORE_INDEX, 3] + [IGNORE_INDEX] * 5  # padding gets no loss
    assert short["attention_mask"][1].tolist() == [1, 1, 0, 0, 0, 0, 0]
    # truncation: source keeps BOS + its last tokens, target its first tokens (EOS counts)
    long_ds = tokenize_instruction([(words(range(3, 30)), words(range(30, 50)))], tok, source_len=5, target_len=4)
    assert long_ds[0]["input_ids"].tolist() == [bos, 26, 27, 28, 29, 30, 31, 32, 33]
    assert long_ds[0]["labels"].tolist() == [IGNORE_INDEX] * 5 + [30, 31, 32, 33]
    assert ds.num_target_tokens() == 3 + 5


def test_instruction_record_formats(tok, tmp_path):
    src, tgt = instruction_pair({"instruction": "t5 t6", "input": "t7", "output": "t8"})
    assert "### Instruction:\nt5 t6" in src and "### Input:\nt7" in src and src.endswith("### Response:\n")
    assert tgt == "t8"
    src, tgt = instruction_pair({"instruction": "t5", "input": "", "output": "t8"})
    assert "### Input" not in src
    assert instruction_pair({"prompt": "t1 t2", "response": "t3"}) == ("t1 t2", "t3")
    src, tgt = instruction_pair({"conversations": [{"from": "human", "value": "t4"}, {"from": "gpt", "value": "t5"},
                                                   {"from": "human", "value": "t6"}, {"from": "gpt", "value": "t7"}]})
    assert tgt == "t7" and "t4" in src and "t5" in src and "t6" in src
    with pytest.raises(ValueError, match="instruction records need"):
        instruction_pair({"foo": 1})
    recs = [{"instruction": words([5 + i]), "input": "", "output": words([20 + i, 21 + i])} for i in range(5)]
    (tmp_path / "alpaca.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    (tmp_path / "alpaca.json").write_text(json.dumps(recs))
    a = load_e2e_data(str(tmp_path / "alpaca.jsonl"), tok, "instruction", n_samples=4)
    b = load_e2e_data(str(tmp_path / "alpaca.json"), tok, "instruction", n_samples=4)
    assert len(a) == len(b) == 4 and all(torch.equal(x, y) for x, y in zip(a.input_ids, b.input_ids))
    assert a[2]["labels"][-3:].tolist() == [22, 23, tok.eos_token_id]
    train, val = a.split(default_val_samples(len(a)))
    assert len(train) == 3 and len(val) == 1


def test_missing_file_and_unreachable_dataset_name_give_clear_errors(tok, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError):
        load_e2e_data(str(tmp_path / "nope.jsonl"), tok, "pretrain")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="not a file, and loading it as a `datasets` name failed"):
        load_e2e_data("some-org/surely-not-cached-dataset-xyz", tok, "pretrain")
    with pytest.raises(ValueError, match="format"):
        load_e2e_data("x.jsonl", tok, "chat")
