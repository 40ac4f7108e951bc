import pytest

from k2serve.text.chat_template import (
    ChatTemplate,
    TemplateError,
    UnsupportedContentError,
    flatten_text_parts,
    normalize_messages,
)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_render_chatml():
    t = ChatTemplate(CHATML)
    msgs = [{"role": "user", "content": "hi"}]
    assert t.render(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert t.render(msgs, add_generation_prompt=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_trim_and_lstrip_blocks():
    t = ChatTemplate("{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}")
    assert t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a\nb\n"


def test_special_tokens_and_kwargs_are_variables():
    t = ChatTemplate("{{ bos_token }}|{{ eos_token }}|{{ enable_thinking }}|{{ pad_token is defined }}",
                     bos_token="<s>", eos_token="</s>")
    assert t.render([], enable_thinking=False) == "<s>|</s>|False|False"
    assert t.render([], bos_token="X") == "X|</s>||False"


def test_raise_exception_becomes_template_error():
    t = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}")
    with pytest.raises(TemplateError, match="Conversation must start with user"):
        t.render([{"role": "assistant", "content": "x"}])
    assert isinstance(TemplateError("x"), ValueError)


def test_syntax_and_runtime_errors_become_template_error():
    with pytest.raises(TemplateError, match="syntax"):
        ChatTemplate("{% for %}")
    # str + list: a template that expects string content given content parts
    with pytest.raises(TemplateError, match="TypeError"):
        ChatTemplate(CHATML).render([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])


def test_tojson_is_plain_json_with_options():
    t = ChatTemplate("{{ tools | tojson }}#{{ tools[0] | tojson(indent=2) }}")
    out = t.render([], tools=[{"name": "<é&>"}])
    assert out == '[{"name": "<é&>"}]#{\n  "name": "<é&>"\n}'


def test_helpers_and_generation_tag():
    t = ChatTemplate(
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{% if loop.index > 1 %}{% break %}{% endif %}{% generation %}[{{ m.content }}]{% endgeneration %}"
        "{% endfor %}{{ ns.n }}{{ dict(a=1)['a'] }}{{ strftime_now('%Y') | length }}"
    )
    assert t.render([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]) == "[x]214"


def test_sandbox_blocks_internals():
    with pytest.raises(TemplateError):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([])
    with pytest.raises(TemplateError):
        ChatTemplate("{% set ns = namespace(_x=1) %}").render([])
    with pytest.raises(TemplateError):  # immutable: templates cannot mutate the caller's data
        ChatTemplate("{{ messages.append(1) }}").render([])


def test_none_values_are_dropped_and_reasoning_aliased():
    t = ChatTemplate("{% for m in messages %}{{ m.content is defined }}/{{ m.reasoning_content }}/{{ m.thinking }}{% endfor %}")
    msgs = [{"role": "assistant", "content": None, "reasoning": "hmm"}]
    assert t.render(msgs) == "False/hmm/hmm"
    assert msgs == [{"role": "assistant", "content": None, "reasoning": "hmm"}]  # not modified


def test_normalize_messages():
    msgs = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "ok"},
    ]
    assert normalize_messages(msgs) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "ok"},
    ]
    assert msgs[0]["role"] == "developer"  # input untouched
    assert normalize_messages(msgs[1:2], flatten_content=False)[0]["content"] == msgs[1]["content"]


def test_non_text_parts_are_reported():
    msgs = [{"role": "user", "content": "x"},
            {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {}}]}]
    with pytest.raises(UnsupportedContentError) as e:
        normalize_messages(msgs)
    assert (e.value.part_type, e.value.message_index) == ("image_url", 1)
    assert "image_url" in str(e.value) and "messages[1]" in str(e.value)
    assert flatten_text_parts([]) == ""


def test_pydantic_like_messages():
    class Msg:
        def __init__(self, **kw):
            self.kw = kw

        def model_dump(self, exclude_none=False):
            return {k: v for k, v in self.kw.items() if not (exclude_none and v is None)}

    out = normalize_messages([Msg(role="developer", content="s", name=None)])
    assert out == [{"role": "system", "content": "s"}]
    assert ChatTemplate(CHATML).render([Msg(role="user", content="hi")], add_generation_prompt=False) == (
        "<|im_start|>user\nhi<|im_end|>\n"
    )


def test_from_tokenizer_requires_a_template():
    class NoTemplate:
        chat_template = None
        special_tokens_map = {}

    with pytest.raises(TemplateError, match="no chat template"):
        ChatTemplate.from_tokenizer(NoTemplate())
