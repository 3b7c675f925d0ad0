"""The worked parameter counts of METHODS.md section 1."""

from torch import nn

from lorakit import LoraConfig, get_peft_model


def counts(d_out, d_in, r):
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    return get_peft_model(model, LoraConfig(r=r, target_modules=["0"])).get_nb_trainable_parameters()


def test_4096_square_rank_8_is_256x_smaller():
    trainable, total = counts(4096, 4096, 8)
    assert trainable == 65_536 and total - trainable == 16_777_216
    assert (total - trainable) // trainable == 256


def test_attention_example_512_by_64():
    trainable, total = counts(512, 64, 8)
    assert trainable == 8 * 64 + 512 * 8 == 4_608
    assert total - trainable == 32_768
    assert round(1 - trainable / (total - trainable), 2) == 0.86


def test_print_trainable_parameters_format(capsys):
    model = get_peft_model(nn.Sequential(nn.Linear(64, 512, bias=False)), LoraConfig(r=8, target_modules=["0"]))
    model.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == "trainable params: 4,608 || all params: 37,376 || trainable%: 12.3288"
