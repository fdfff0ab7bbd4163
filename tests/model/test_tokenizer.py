from op_sensitivity.model.processor import IMAGE_PAD, SPECIAL_TOKENS
from op_sensitivity.model.tokenizer import train_tokenizer


def test_tokenizer_has_qwen_special_tokens_first():
    tok = train_tokenizer(["a red square", "two blue circles"], 400)
    assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    ids = tok("a red square<|image_pad|>")["input_ids"]
    assert ids[-1] == tok.convert_tokens_to_ids(IMAGE_PAD)
    assert tok.decode(ids[:-1]) == "a red square"
