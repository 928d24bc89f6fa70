"""Chat prompts: messages rendered with the model's own chat template, as transformers'
`apply_chat_template(messages, add_generation_prompt=True, tokenize=True)` renders and
encodes them.

    ids = chat.encode(tokenizer, [{'role': 'user', 'content': 'Hi'}])

Messages that end with an assistant message are continued, as transformers' text-generation
pipeline does by default (`continue_final_message=True`): the reply is started for the
model (a "reply prefix", e.g. a code fence that makes a small chat model answer in code)
and generation goes on from its last character.

The template is Jinja run in an immutable sandbox with transformers' settings
(trim_blocks, lstrip_blocks, loop controls) and globals (`raise_exception`,
`strftime_now`, a `tojson` that keeps non-ASCII text), with the tokenizer's special
tokens (`bos_token`, `eos_token`, ...) as variables. The rendered text already holds
every special token the template writes, so it is encoded without adding BOS again.
"""
import datetime
import functools
import json

import numpy as np

Messages = list[dict]


def user_message(text: str) -> Messages:
  return [{'role': 'user', 'content': text}]


def check_messages(messages, where: str = 'messages') -> Messages:
  """A non-empty list of {'role': str, 'content': str, ...}, or a one-line ValueError."""
  if not isinstance(messages, list) or not messages:
    raise ValueError(f'{where}: expected a non-empty list of messages, got {messages!r:.80}.')
  for i, message in enumerate(messages):
    if not isinstance(message, dict) or not isinstance(message.get('role'), str):
      raise ValueError(f'{where}[{i}]: a message is an object with a "role" string, got '
                       f'{message!r:.80}.')
    if 'content' not in message:
      raise ValueError(f'{where}[{i}]: the message has no "content".')
  # Like transformers: keys whose value is None are dropped (templates test for presence).
  return [{k: v for k, v in m.items() if v is not None} for m in messages]


@functools.lru_cache(maxsize=16)
def compile_template(template: str):
  """The Jinja template compiled in transformers' environment."""
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; transformers' does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(format):
    return datetime.datetime.now().strftime(format)

  class GenerationTag(jinja2.ext.Extension):
    """transformers' {% generation %}...{% endgeneration %} (marks assistant text for
    training masks): here it renders its body unchanged."""
    tags = {'generation'}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(['name:endgeneration'], drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method('_body'), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[GenerationTag, jinja2.ext.loopcontrols])
  env.filters['tojson'] = tojson
  env.globals['raise_exception'] = raise_exception
  env.globals['strftime_now'] = strftime_now
  return env.from_string(template)


def template_variables(tokenizer) -> dict:
  """The special tokens a template may read (transformers passes its special_tokens_map)."""
  out = {}
  for name, token_id in (('bos_token', tokenizer.bos_id), ('eos_token', tokenizer.eos_id),
                         ('pad_token', tokenizer.pad_id)):
    text = tokenizer.token_string(token_id)
    if text is not None:
      out[name] = text
  return out


def continues_reply(messages) -> bool:
  """Whether `messages` end with an assistant message, which is then continued (the
  default of transformers' text-generation pipeline)."""
  return bool(messages) and isinstance(messages[-1], dict) and \
      messages[-1].get('role') == 'assistant'


def check_reply_prefix(messages, where: str = 'messages') -> None:
  """A final assistant message is continued (a reply prefix), so its content must be
  non-empty text; else a one-line ValueError naming `where`."""
  final = messages[-1].get('content')
  if not isinstance(final, str) or not final.strip():
    raise ValueError(f'{where}: the last message ({final!r:.60}) cannot be continued: a '
                     f'reply prefix must be non-empty text.')


def render(tokenizer, messages, add_generation_prompt: bool = True,
           continue_final_message: bool = False, **kwargs) -> str:
  """The chat text of `messages` under the tokenizer's chat template. Raises a one-line
  ValueError when the model has no template or the template refuses or cannot render
  the messages (a TypeError inside it, e.g. a non-string "content" it concatenates).

  continue_final_message: the text ends with the last message's content, without the
  end-of-turn the template writes after it, so that the model continues that message
  (transformers' apply_chat_template(continue_final_message=True): the template renders
  without a generation prompt and the text is cut after the last occurrence of the
  content, its trailing whitespace kept only where the template kept it). Raises
  ValueError together with add_generation_prompt, or when the content is not a non-empty
  string the rendered text holds."""
  import jinja2
  template = getattr(tokenizer, 'chat_template', None)
  if not template:
    raise ValueError('This model\'s tokenizer has no chat template, so chat prompts cannot '
                     'be rendered; give plain prompts (without --chat).')
  messages = check_messages(messages)
  if continue_final_message and add_generation_prompt:
    raise ValueError('continue_final_message continues the last message; it cannot be '
                     'combined with add_generation_prompt, which starts a new one.')
  variables = {**template_variables(tokenizer), **kwargs}
  try:
    text = compile_template(template).render(messages=messages, tools=None, documents=None,
                                             add_generation_prompt=add_generation_prompt,
                                             **variables)
  except jinja2.exceptions.TemplateError as e:
    raise ValueError(f'The chat template refused the messages: {e}') from None
  except TypeError as e:   # e.g. a "content" that is not a string, where it wants one
    raise ValueError(f'The chat template cannot render the messages: {e}.') from None
  if not continue_final_message:
    return text
  check_reply_prefix(messages)
  final = messages[-1]['content']
  if final.strip() not in text:
    raise ValueError(f'The last message ({final!r:.60}) cannot be continued: the chat '
                     f'template does not write it out.')
  start = text.rindex(final.strip())
  kept = final.lstrip()
  if text[start:start + len(kept)] == kept:      # the template kept its trailing spaces
    return text[:start + len(kept)]
  return text[:start + len(final.strip())]


def encode(tokenizer, messages, **kwargs) -> np.ndarray:
  """int32 ids of the rendered chat (`render`'s keywords), encoded without adding special
  tokens (the template writes them), as transformers' apply_chat_template(tokenize=True)
  does. By default a final assistant message is continued (continue_final_message, as
  transformers' text-generation pipeline does) and any other chat gets the generation
  prompt."""
  continue_final = kwargs.pop('continue_final_message', continues_reply(messages))
  add_generation_prompt = kwargs.pop('add_generation_prompt', not continue_final)
  return tokenizer.encode(render(tokenizer, messages, add_generation_prompt,
                                 continue_final_message=continue_final, **kwargs))
