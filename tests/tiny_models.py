"""Tiny random models built from configs, saved as sentence-transformers folders (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "Vaccines train the immune system to recognise pathogens.",
    "Bread rises because yeast releases carbon dioxide in the dough.",
    "Plate tectonics explains earthquakes, volcanoes and mountain ranges.",
    "A vector database finds the nearest neighbours of an embedding.",
    "Sleep helps the brain consolidate memories of the day.",
    "Solar panels turn sunlight into electricity with silicon cells.",
    "Honeybees dance to tell their hive where the flowers are.",
] * 4

JAPANESE = [
    "春になると日本各地で桜が咲き、人々は花見を楽しみます。",
    "東京駅から新幹線に乗って京都へ向かいました。",
    "猫が窓辺で気持ちよさそうに昼寝をしている。",
    "今日は雨が降っているので、傘を持って出かけましょう。",
    "富士山は日本で一番高い山として知られています。",
    "図書館で歴史の本を三冊借りてきた。",
    "朝ごはんに味噌汁と焼き魚を食べました。",
    "子どもたちが公園でサッカーをして遊んでいる。",
] * 4


def save_st(model_dir: Path, st_dir: Path, pooling: str, max_seq_length: int, prompts: dict | None = None) -> Path:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models

    transformer = st_models.Transformer(str(model_dir), max_seq_length=max_seq_length)
    pool = st_models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode=pooling)
    st = SentenceTransformer(modules=[transformer, pool], device="cpu", prompts=prompts or {})
    st.save(str(st_dir))
    return st_dir


def bert(tmp: Path, pooling: str, hidden: int = 32, layers: int = 2, max_seq_length: int = 24) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(ENGLISH, trainers.WordPieceTrainer(vocab_size=300, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tok.decoder = decoders.WordPiece()
    suffix = "" if (hidden, layers) == (32, 2) else f"-{hidden}x{layers}"
    model_dir = tmp / f"bert-hf{suffix}"
    hf_tok = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                               sep_token="[SEP]", mask_token="[MASK]")
    hf_tok.save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=2 * hidden,
                     max_position_embeddings=max(64, max_seq_length))
    BertModel(cfg).save_pretrained(model_dir)
    return save_st(model_dir, tmp / f"bert-st-{pooling}{suffix}", pooling, max_seq_length)


def xlmr_japanese(tmp: Path, pooling: str = "mean") -> Path:
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizerFast

    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(JAPANESE, trainers.UnigramTrainer(vocab_size=120, special_tokens=special, unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    model_dir = tmp / "xlmr-hf"
    hf_tok = XLMRobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                     cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    hf_tok.save_pretrained(model_dir)
    torch.manual_seed(1)
    cfg = XLMRobertaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=80, pad_token_id=tok.token_to_id("<pad>"),
                           bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"))
    XLMRobertaModel(cfg).save_pretrained(model_dir)
    return save_st(model_dir, tmp / f"xlmr-st-{pooling}", pooling, 48)


def qwen2_decoder(tmp: Path, padding_side: str) -> Path:
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

    eos = "<|endoftext|>"
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(ENGLISH + ["Instruct: find documents\nQuery: "],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=[eos],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, tok.token_to_id(eos))])
    model_dir = tmp / f"qwen2-hf-{padding_side}"
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos, padding_side=padding_side)
    hf_tok.save_pretrained(model_dir)
    torch.manual_seed(2)
    cfg = Qwen2Config(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128,
                      pad_token_id=tok.token_to_id(eos), eos_token_id=tok.token_to_id(eos))
    Qwen2Model(cfg).save_pretrained(model_dir)
    prompts = {"query": "Instruct: find documents\nQuery: "}
    return save_st(model_dir, tmp / f"qwen2-st-{padding_side}", "lasttoken", 64, prompts)
