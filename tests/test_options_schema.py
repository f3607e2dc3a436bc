"""GenerationOptions is the one decoding-options schema, and TextOptions the one caption-text schema:
the command-line flags, the server's request fields and the engine's DecodeSpec are generated from
(or derived from) them, and must not drift from their names, help texts and types. Also the one
rule: several captions without sampling mean beams."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

from prefixcap.cli import build_parser, main
from prefixcap.cli.common import GENERATION_GROUP, TEXT_GROUP, add_generation_arguments, bounded
from prefixcap.engine.spec import DecodeSpec
from prefixcap.options import GenerationOptions, TextOptions
from prefixcap.serving.schemas import CaptionOptions, JSONCaptionRequest, MultipartCaptionRequest

FIELDS = {option.name: option for option in dataclasses.fields(GenerationOptions)}
TEXT_FIELDS = {option.name: option for option in dataclasses.fields(TextOptions)}
HINTS = typing.get_type_hints(GenerationOptions) | typing.get_type_hints(TextOptions)
SCHEMAS = {GENERATION_GROUP: FIELDS, TEXT_GROUP: TEXT_FIELDS}  # argument group -> its schema's fields


def _command(name: str) -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[name]


def _value_type(name: str) -> type:
    """int for `int | None`, else the annotation itself."""
    return next(t for t in typing.get_args(HINTS[name]) or [HINTS[name]] if t is not type(None))


def _parses_as(parse: typing.Callable[[str], object], kind: type) -> bool:
    """Whether an argparse type parses numbers as `kind`: ints refuse "1.5", and neither takes "nan"."""
    try:
        parse("1.5")
        takes_fractions = True
    except argparse.ArgumentTypeError:
        takes_fractions = False
    try:
        parse("nan")
        return False
    except argparse.ArgumentTypeError:
        pass
    return takes_fractions == (kind is float) and type(parse("3")) is kind


def cli_drift(parser: argparse.ArgumentParser, title: str = GENERATION_GROUP) -> list[str]:
    """Where `parser`'s flags in group `title` differ from its schema (GenerationOptions for the
    decoding group, TextOptions for the caption text group): one line per difference."""
    fields = SCHEMAS[title]
    group = next((g for g in parser._action_groups if g.title == title), None)
    if group is None:
        return [f"no {title!r} argument group"]
    actions = {action.dest: action for action in group._group_actions}
    schema = "GenerationOptions" if fields is FIELDS else "TextOptions"
    problems = [f"{dest}: not a {schema} field" for dest in sorted(set(actions) - set(fields))]
    problems += [f"{name}: no flag" for name in sorted(set(fields) - set(actions))]
    elsewhere = {a.dest for a in parser._actions if a not in group._group_actions} & set(fields)
    problems += [f"{dest}: also set outside the {title!r} group" for dest in sorted(elsewhere)]
    for name in sorted(set(fields) & set(actions)):
        action, option = actions[name], fields[name]
        flag = option.metadata.get("flag", "--" + name.replace("_", "-"))
        if action.option_strings[0] != flag:
            problems.append(f"{name}: flag {action.option_strings[0]}, not {flag}")
        if action.help != option.metadata["help"]:
            problems.append(f"{name}: help {action.help!r}, not the field's {option.metadata['help']!r}")
        if action.default is not None:
            problems.append(f"{name}: default {action.default!r}; unset must mean the model's default")
        kind = _value_type(name)
        if kind is bool:
            if not isinstance(action, argparse.BooleanOptionalAction):
                problems.append(f"{name}: a bool, but not a --x/--no-x flag")
        elif kind is str:
            if action.type is not None or action.nargs is not None:
                problems.append(f"{name}: text, but not taken as one plain argument")
        elif not (action.type and _parses_as(action.type, kind)):
            problems.append(f"{name}: does not parse as a finite {kind.__name__}")
    return problems


@pytest.mark.parametrize("title", [GENERATION_GROUP, TEXT_GROUP])
@pytest.mark.parametrize("command", ["caption", "evaluate"])
def test_decoding_flags_are_the_generation_options(command: str, title: str) -> None:
    assert cli_drift(_command(command), title) == []


def test_the_drift_check_notices_a_hand_written_text_flag() -> None:
    parser = argparse.ArgumentParser()
    add_generation_arguments(parser)
    group = next(g for g in parser._action_groups if g.title == TEXT_GROUP)
    group.add_argument("--trigger", help="a trigger word")
    next(a for a in group._group_actions if a.dest == "suffix").type = int
    assert cli_drift(parser, TEXT_GROUP) == [
        "trigger: not a TextOptions field",
        "suffix: text, but not taken as one plain argument",
    ]


def test_the_drift_check_notices_a_hand_written_flag() -> None:
    parser = argparse.ArgumentParser()
    add_generation_arguments(parser)
    group = next(g for g in parser._action_groups if g.title == GENERATION_GROUP)
    group.add_argument("--beams", type=bounded(int), help="beam search")
    group._group_actions[0].help = "stale help"  # --max-new-tokens
    assert cli_drift(parser) == [
        "beams: not a GenerationOptions field",
        "max_new_tokens: help 'stale help', not the field's 'longest caption, in tokens'",
    ]


def test_users_keep_their_flag_names() -> None:
    args = _command("caption").parse_args(["a.jpg", "--num-captions", "3", "--do-sample", "--no-early-stopping"])
    assert (args.num_return_sequences, args.do_sample, args.early_stopping) == (3, True, False)
    args = _command("caption").parse_args(["a.jpg", "--prompt", "a photo of", "--keep-prompt", "--prefix", "sks, "])
    assert (args.prompt, args.keep_prompt, args.prefix, args.suffix) == ("a photo of", True, "sks, ", None)


@pytest.mark.parametrize("schema", [CaptionOptions, JSONCaptionRequest, MultipartCaptionRequest])
def test_the_server_schema_is_the_generation_options(schema) -> None:
    # the images, `rerank` (it orders the decoded captions, so it is no decoding option) and
    # `show_retrieved` (what a retrieving server returns besides captions)
    others = ("images", "rerank", "show_retrieved")
    fields = {name: info for name, info in schema.model_fields.items() if name not in others}
    assert list(fields) == list(FIELDS) + list(TEXT_FIELDS)
    for name, info in fields.items():
        assert info.description == (FIELDS | TEXT_FIELDS)[name].metadata["help"], name
        assert info.annotation == HINTS[name] | None, name
        assert info.default is None, name
    assert schema.model_config["extra"] == "forbid"


def test_decode_spec_holds_the_options_and_keys_graphs_without_the_seed() -> None:
    """The engine's spec holds the caller's GenerationOptions (checked once, where they were made)
    instead of re-declaring or re-checking them; CUDA graphs are keyed on everything but the seed."""
    options = GenerationOptions(num_beams=3, seed=1)
    spec = DecodeSpec.of(options, eos_token_ids=[5, 2, 5], pad_token_id=0)
    assert spec.options is options and spec.stop_token_ids == (2, 5)
    assert not {option.name for option in dataclasses.fields(DecodeSpec)} & set(FIELDS)
    assert spec == DecodeSpec.of(GenerationOptions(num_beams=3, seed=2), eos_token_ids=[2, 5], pad_token_id=0)
    assert spec != DecodeSpec.of(GenerationOptions(num_beams=4, seed=1), eos_token_ids=[2, 5], pad_token_id=0)


# ------------------------------------------------------------------------ types and the beams rule
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": "5"}, "max_new_tokens must be an integer, got '5'"),
        ({"max_new_tokens": 5.0}, "max_new_tokens must be an integer, got 5.0"),
        ({"do_sample": "no"}, "do_sample must be true or false, got 'no'"),
        ({"num_beams": True}, "num_beams must be an integer, got True"),
        ({"seed": "7"}, "seed must be an integer or null, got '7'"),
        ({"temperature": "warm"}, "temperature must be a number, got 'warm'"),
    ],
)
def test_mistyped_options_are_refused_by_name(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        GenerationOptions.from_kwargs(kwargs)
    with pytest.raises(ValueError, match=f"^{message}$"):
        GenerationOptions.resolve({}, {"num_return_sequences": 2, **kwargs})


def test_integers_for_float_options_become_floats() -> None:
    options = GenerationOptions.from_kwargs({"temperature": 2, "do_sample": True})
    assert type(options.temperature) is float and options == GenerationOptions(temperature=2.0, do_sample=True)


@pytest.mark.parametrize(
    "defaults, requested, beams",
    [
        ({}, {"num_return_sequences": 3}, 3),  # several captions, greedy: beams switch on
        ({"num_beams": 5}, {"num_return_sequences": 3}, 5),  # more beams than captions are kept
        ({"num_return_sequences": 3, "num_beams": 3}, {"max_new_tokens": 5}, 3),
        ({"do_sample": True}, {"num_return_sequences": 3}, 1),  # the model samples: no beams
        ({}, {"num_return_sequences": 3, "do_sample": True}, 1),
        ({"num_return_sequences": 3, "do_sample": True}, {"do_sample": False}, 3),
    ],
)
def test_several_captions_without_sampling_switch_beams_on(defaults, requested, beams) -> None:
    assert GenerationOptions.resolve(defaults, requested).num_beams == beams


def test_requested_beams_are_never_changed() -> None:
    with pytest.raises(ValueError, match="num_return_sequences must be <= num_beams without sampling"):
        GenerationOptions.resolve({}, {"num_beams": 2, "num_return_sequences": 4})
    assert GenerationOptions.resolve({}, {"num_beams": 4, "num_return_sequences": 2}).num_beams == 4


def test_the_cli_applies_the_same_rule(tiny_model_dir, example_images, capsys) -> None:
    image = str(example_images[0])
    code = main(["caption", image, "--model", str(tiny_model_dir), "--num-beams", "2", "--num-captions", "4"])
    assert code == 2
    assert capsys.readouterr().err == (
        "error: num_return_sequences must be <= num_beams without sampling (greedy gives one caption)\n"
    )


@pytest.mark.parametrize(
    ("name", "value", "line"),
    [
        ("top_p", 1.5, "top_p must be in (0, 1], got 1.5"),
        ("num_beams", 0, "num_beams must be >= 1, got 0"),
        ("repetition_penalty", 0.0, "repetition_penalty must be > 0, got 0.0"),
    ],
)
def test_an_out_of_range_option_is_one_line_the_same_everywhere(
    name: str, value: float, line: str, tiny_model_dir, example_images, capsys
) -> None:
    """The range is the field's `bounds`, checked by the one validator where each entry point
    builds its request: the Python API, the server and the CLI all say the same line."""
    from fastapi.testclient import TestClient

    from prefixcap import Captioner
    from prefixcap.serving import ServerConfig, create_app
    from prefixcap.serving.app import CAPTION_PATH

    captioner = Captioner.from_pretrained(tiny_model_dir, device="cpu", dtype="float32")
    with pytest.raises(ValueError) as raised:
        captioner.request(**{name: value})
    assert str(raised.value) == line
    with TestClient(create_app(captioner, ServerConfig(model_name="tiny"))) as client:
        image = ("images", ("a.jpg", example_images[0].read_bytes()))
        answer = client.post(CAPTION_PATH, files=[image], data={name: str(value)})
    assert answer.status_code == 422 and answer.json()["error"]["message"] == line
    flag = FIELDS[name].metadata.get("flag", "--" + name.replace("_", "-"))
    assert main(["caption", str(example_images[0]), "--model", str(tiny_model_dir), flag, str(value)]) == 2
    assert capsys.readouterr().err == f"error: {line}\n"


def test_a_training_option_out_of_range_is_the_same_line_on_the_command_line(tmp_path, capsys) -> None:
    """Training's flags are checked as they are parsed, by the validator TrainConfig uses."""
    from prefixcap.errors import UserError
    from prefixcap.training import TrainConfig

    with pytest.raises(UserError) as raised:
        TrainConfig(mapper_num_layers=65)
    assert str(raised.value) == "mapper_num_layers must be in [1, 64], got 65"
    for flag in ("--mapper-num-layers", "--mapper-layers"):  # the flag users know still works
        with pytest.raises(SystemExit):
            main(["train", str(tmp_path), flag, "65"])
        last = capsys.readouterr().err.splitlines()[-1]
        assert last == f"prefixcap train: error: argument --mapper-num-layers/--mapper-layers: {raised.value}"
