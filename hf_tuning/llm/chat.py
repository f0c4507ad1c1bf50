"""``hf-tuning chat``: talk to a tuned model in the terminal, or feed it questions from a script.

The model is a base (``--base``), a base with an adapter folder a recipe wrote (``--adapter``; PEFT LoRA or
SNELL / SNELLA) or a merged folder (``--model``, as ``hf-tuning merge`` writes it). Prompts are rendered with
the tokenizer saved next to the adapter or model, since it carries the chat template the model was trained
on; a model that was trained on one template and prompted with another answers worse or never stops.

Two pieces: :class:`ChatSession` holds the conversation and generates one reply at a time (tests and
notebooks drive it directly); :func:`run_chat` is the line loop the command runs over standard input.
Replies go to standard output, everything else (banner, prompts, notes, errors) to standard error, so
``printf 'question\\n' | hf-tuning chat ... > answers.txt`` captures the answers only.

Heavy libraries are imported inside the functions: registering the command must keep ``hf-tuning plan`` fast.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

__all__ = [
    "COMMANDS_HELP",
    "ChatModel",
    "ChatSession",
    "GenerationSettings",
    "context_length",
    "load_chat_model",
    "register",
    "run_chat",
]

Message = dict[str, str]

COMMANDS_HELP = """commands:
  /help          this list
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   use TEXT as the system prompt from the next reply on (/system alone: none)
  /prompt        show the prompt text the last reply was generated from
  /exit, /quit   end the chat (so does the end of the input, Ctrl-D)"""

DTYPES = ("auto", "float32", "bfloat16", "float16")


# --------------------------------------------------------------------------- the session


@dataclass(frozen=True)
class GenerationSettings:
    """How a reply is decoded. One rule: ``temperature`` 0 (the default) is greedy decoding, above 0 samples.

    ``top_p``, ``top_k`` and ``seed`` only mean something when sampling, so setting them with temperature 0 is
    an error rather than a silently ignored flag. The model's own ``generation_config`` sampling defaults are
    not used: what these fields say is what generation does.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be 0 (greedy) or positive (sampling), got {self.temperature}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"--repetition_penalty must be positive (1.0: none), got {self.repetition_penalty}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top_k must be at least 1, got {self.top_k}")
        if not self.sampling:
            given = [f"--{name}" for name in ("top_p", "top_k", "seed") if getattr(self, name) is not None]
            if given:
                raise ValueError(
                    f"{', '.join(given)} only apply to sampling, and decoding is greedy: "
                    "set --temperature above 0 to sample"
                )

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def describe(self) -> str:
        if not self.sampling:
            return "greedy decoding"
        parts = [f"temperature {self.temperature}"]
        parts += [f"{name} {getattr(self, name)}" for name in ("top_p", "top_k", "seed") if getattr(self, name)]
        return "sampling with " + ", ".join(parts)

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``model.generate``; each one set, so the model's defaults cannot leak in."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.sampling,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.sampling:
            kwargs.update(temperature=self.temperature, top_p=self.top_p or 1.0, top_k=self.top_k or 0)
        else:  # unset the sampling fields a generation_config may carry (they would only warn)
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


def context_length(config: Any, tokenizer: Any = None) -> int | None:
    """How many tokens (prompt and reply) a model with this config reads at most: its position limit, else the
    tokenizer's ``model_max_length`` when that is a real limit; ``None`` when neither says."""
    config = getattr(config, "get_text_config", lambda: config)()  # a multimodal config's text part
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else None


def check_room_for_prompt(max_new_tokens: int, max_context: int | None) -> None:
    if max_context is not None and max_new_tokens >= max_context:
        raise ValueError(
            f"--max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
            f"{max_context} tokens"
        )


@functools.cache
def _reply_streamer_class() -> type:
    """transformers' ``TextStreamer`` (its word by word decoding) writing to a stream of our choice; the stop
    token that ends the reply is not written, special or not. Built on first use, so that registering the
    command does not import transformers."""
    import torch
    from transformers import TextStreamer

    class ReplyStreamer(TextStreamer):
        def __init__(self, tokenizer: Any, stream_to: TextIO, stop_token_ids: list[int]) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.stream_to = stream_to
            self.stop_token_ids = torch.tensor(stop_token_ids)

        def put(self, value: torch.Tensor) -> None:
            if not self.next_tokens_are_prompt:  # batch size 1: a stop token is the last token generated
                value = value.reshape(-1)
                value = value[~torch.isin(value, self.stop_token_ids.to(value.device))]
                if value.numel() == 0:
                    return
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                self.stream_to.write(text)
                self.stream_to.flush()

    return ReplyStreamer


class ChatSession:
    """One conversation with a causal LM: its history, the system prompt, how replies are decoded.

    ``stop_token_ids`` ends a reply (default: the end-of-turn and EOS tokens
    :func:`~hf_tuning.llm.chat_templates.stop_token_ids` finds for ``template``). When a new message with the
    history would not fit the model's context together with ``max_new_tokens``, the oldest turns are dropped
    (the system prompt stays) and a note goes to ``notes`` (standard error by default).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        settings: GenerationSettings | None = None,
        system_prompt: str | None = None,
        template: str = "",
        stop_token_ids: list[int] | None = None,
        max_context: int | None = None,
        notes: TextIO | None = None,
    ) -> None:
        if not isinstance(tokenizer.chat_template, str):
            raise ValueError(
                f"the tokenizer {tokenizer.name_or_path!r} has no chat template: pass --chat_template "
                "(llama3, llama3.1, chatml or a .jinja file)"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.settings = settings or GenerationSettings()
        self.system_prompt = system_prompt or None
        if stop_token_ids is None:
            from hf_tuning.llm.chat_templates import stop_token_ids as find_stop_tokens

            stop_token_ids = find_stop_tokens(
                tokenizer, template, generation_config=getattr(model, "generation_config", None)
            )
        if not stop_token_ids:
            raise ValueError("no stop token: the tokenizer has no EOS token and the template no end-of-turn token")
        self.stop_token_ids = list(stop_token_ids)
        self.max_context = max_context if max_context is not None else context_length(model.config, tokenizer)
        check_room_for_prompt(self.settings.max_new_tokens, self.max_context)
        self.notes = notes
        self.history: list[Message] = []
        self.last_prompt: str | None = None
        self._replies = 0  # replies since the last reset: the sampling seed of the next one is seed + this

    def reset(self) -> None:
        """Forget the conversation; the system prompt and the settings stay."""
        self.history.clear()
        self._replies = 0

    def messages(self, text: str, history: list[Message] | None = None) -> list[Message]:
        """The system prompt, the history (the session's own by default) and ``text`` as the next user message."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, *(self.history if history is None else history), {"role": "user", "content": text}]

    def render(self, text: str, history: list[Message] | None = None) -> str:
        """The prompt text for ``text`` as the next user message: the chat template with the generation prompt."""
        try:
            return self.tokenizer.apply_chat_template(
                self.messages(text, history), add_generation_prompt=True, tokenize=False
            )
        except Exception as error:  # jinja2 raises its own types (e.g. a template that rejects system turns)
            raise ValueError(f"the chat template cannot render this conversation: {error}") from error

    def encode(self, text: str) -> list[int]:
        """Token ids of the prompt for ``text``, dropping the oldest turns while it does not fit the context
        (if ``text`` cannot fit even alone, the error leaves the history as it was).

        No special tokens are added: the template writes its own BOS.
        """
        kept = list(self.history)
        budget = None if self.max_context is None else self.max_context - self.settings.max_new_tokens
        while True:
            prompt = self.render(text, kept)
            ids = list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if budget is None or len(ids) <= budget:
                break
            if not kept:
                raise ValueError(
                    f"the message is too long: its prompt has {len(ids)} tokens, and with --max_new_tokens "
                    f"{self.settings.max_new_tokens} the model's context of {self.max_context} tokens leaves "
                    f"room for {budget}; shorten it (or the system prompt) or lower --max_new_tokens"
                )
            del kept[:2]  # the oldest user message and the reply to it
        dropped = (len(self.history) - len(kept)) // 2
        if dropped:
            self._note(
                f"note: the conversation no longer fits the model's context of {self.max_context} tokens; "
                f"dropped the oldest {dropped} turn{'s' if dropped > 1 else ''} (the system prompt stays)"
            )
            self.history = kept
        self.last_prompt = prompt
        return ids

    def reply(self, text: str, stream_to: TextIO | None = None) -> str:
        """Answer ``text`` as the next user message and add both to the history; the reply is written to
        ``stream_to`` token by token while it is generated (when given) and returned in full."""
        import torch

        ids = self.encode(text)
        device = self.model.device
        input_ids = torch.tensor([ids], device=device)
        streamer = None
        if stream_to is not None:
            streamer = _reply_streamer_class()(self.tokenizer, stream_to, self.stop_token_ids)
        pad = self.tokenizer.pad_token_id
        kwargs = {
            **self.settings.generate_kwargs(),
            "eos_token_id": self.stop_token_ids,
            "pad_token_id": self.stop_token_ids[0] if pad is None else pad,
        }
        with torch.inference_mode(), self._seeded(device):
            output = self.model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids), streamer=streamer, **kwargs
            )
        tokens = output[0, len(ids) :].tolist()
        if tokens and tokens[-1] in self.stop_token_ids:
            tokens.pop()  # the end of the turn, not part of the reply (even where it is not a special token)
        reply = self.tokenizer.decode(tokens, skip_special_tokens=True)
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        self._replies += 1
        return reply

    @contextlib.contextmanager
    def _seeded(self, device: Any) -> Iterator[None]:
        """With a seed, reply n after a reset samples from ``seed + n`` on a forked generator, so a scripted
        conversation is reproducible whatever else used the random state; without one, the global state."""
        if self.settings.seed is None:
            yield
            return
        import torch

        cuda = (
            [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        )
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.settings.seed + self._replies)
            yield

    def _note(self, message: str) -> None:
        stream = self.notes if self.notes is not None else sys.stderr
        print(message, file=stream, flush=True)


# --------------------------------------------------------------------------- the line loop


def run_chat(
    session: ChatSession,
    lines: TextIO,
    out: TextIO,
    err: TextIO,
    *,
    interactive: bool,
    banner: str = "",
) -> int:
    """Read user messages and commands from ``lines`` until ``/exit`` or its end; write each reply to ``out``
    (streamed, then a newline) and all else to ``err``.

    ``interactive`` (a terminal) adds a banner, a ``you>`` prompt and command acknowledgements, all on
    ``err``; scripted runs get none of them. In a terminal Ctrl-C stops the reply being generated (the
    exchange is forgotten, as if never asked) and the chat goes on; at the prompt, or in a script, it ends it.
    Empty lines are skipped. A message that cannot be answered (e.g. longer than the context) prints an error
    on ``err`` and no reply; the loop goes on, and the return value is then 1 (else 0).
    """
    failed = False

    def say(message: str) -> None:
        print(message, file=err, flush=True)

    if interactive:
        usage = "/help lists the commands; Ctrl-C stops a reply; /exit or Ctrl-D ends the chat."
        say(f"{banner}\n{usage}" if banner else usage)
    while True:
        if interactive:
            err.write("you> ")
            err.flush()
        line = lines.readline()
        if not line:  # end of input (Ctrl-D)
            if interactive:
                say("")
            break
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        command, _, argument = text.strip().partition(" ")
        if command in ("/exit", "/quit"):
            break
        if command == "/help":
            say(COMMANDS_HELP)
        elif command == "/reset":
            session.reset()
            if interactive:
                say("(conversation cleared)")
        elif command == "/system":
            session.system_prompt = argument.strip() or None
            if interactive:
                say(f"(system prompt: {session.system_prompt!r})")
        elif command == "/prompt":
            say(session.last_prompt if session.last_prompt is not None else "(no reply yet)")
        elif command.startswith("/") and command[1:].isalpha():
            say(f"unknown command {command!r} (it was not sent to the model)\n{COMMANDS_HELP}")
        else:
            try:
                session.reply(text, stream_to=out)
            except ValueError as error:
                failed = True
                say(f"error: {error}")
                continue
            except KeyboardInterrupt:
                if not interactive:
                    raise
                out.write("\n")
                out.flush()
                say("(reply stopped; that message and its partial reply are not kept)")
                continue
            out.write("\n")
            out.flush()
    return 1 if failed else 0


# --------------------------------------------------------------------------- loading


@dataclass
class ChatModel:
    """What a session is built from: the model on its device, the tokenizer with the template it renders, the
    template's name (for the stop tokens; ``""`` when unknown: EOS only) and a one-line description."""

    model: Any
    tokenizer: Any
    template: str
    description: str
    notes: list[str] = field(default_factory=list)


def load_chat_model(
    *,
    base: str | None = None,
    adapter: str | None = None,
    model: str | None = None,
    chat_template: str | None = None,
    max_new_tokens: int | None = None,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
) -> ChatModel:
    """Check the sources, load the tokenizer and pick its template, then load the weights (in that order, so
    a wrong folder or template fails in seconds).

    ``chat_template`` None uses the template saved with the adapter or merged model (the training one);
    when the adapter folder has no tokenizer, the base model's tokenizer and template are used, with a note.
    A name (``auto``, ``llama3``, ``llama3.1``, ``chatml``) or a ``.jinja`` path replaces it.
    """
    from hf_tuning.llm.adapters import adapter_base_model, adapter_tokenizer, attach_adapter, check_adapter_dir
    from hf_tuning.llm.chat_templates import apply_training_chat_template, known_template_name
    from hf_tuning.llm.loading import check_model_exists, load_causal_lm, load_tokenizer

    notes: list[str] = []
    if model is not None and (adapter is not None or base is not None):
        raise ValueError(
            "--model is a merged model folder and takes neither --adapter nor --base; "
            "chat with a base and an adapter as --base B --adapter A"
        )
    if model is not None and not (Path(model).expanduser() / "config.json").is_file():
        what = "does not exist" if not Path(model).expanduser().exists() else "has no config.json"
        raise FileNotFoundError(f"--model {model!r} {what}: expected a merged model folder (hf-tuning merge)")
    if adapter is not None:
        adapter = str(check_adapter_dir(adapter))
        if base is None:
            base = adapter_base_model(adapter)
            if base is None:
                raise ValueError(f"the adapter {adapter!r} records no base model: pass --base")
    weights = model if model is not None else base
    if weights is None:
        raise ValueError("nothing to chat with: pass --model D (merged), --base B --adapter A, or --base B")
    options = {"trust_remote_code": trust_remote_code}
    source = check_model_exists(weights, **options)
    if max_new_tokens is not None and source.kind != "gguf":  # a GGUF's config is read when it loads
        from transformers import AutoConfig

        check_room_for_prompt(max_new_tokens, context_length(AutoConfig.from_pretrained(source.path, **options)))

    tokenizer = adapter_tokenizer(adapter, **options) if adapter is not None else None
    if tokenizer is None:
        tokenizer = load_tokenizer(weights, **options)
        if adapter is not None:
            notes.append(
                f"note: the adapter folder {adapter!r} has no tokenizer; using the base model's tokenizer and its "
                "chat template, which may not be the one the adapter was trained with (see --chat_template)"
            )
    if chat_template is not None:
        template = apply_training_chat_template(tokenizer, chat_template)
    else:
        if not isinstance(tokenizer.chat_template, str):
            raise ValueError(
                f"the tokenizer of {adapter or weights!r} has no chat template: pass --chat_template "
                "(auto, llama3, llama3.1, chatml or a .jinja file)"
            )
        template = known_template_name(tokenizer)

    loaded = load_causal_lm(weights, dtype=dtype, **options).to(_device(device))
    if adapter is not None:
        loaded = attach_adapter(loaded, adapter)
    description = f"{base} + {adapter}" if adapter is not None else str(weights)
    return ChatModel(loaded.eval(), tokenizer, template, description, notes)


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available (use --device cpu)")
    return torch.device(name)


# --------------------------------------------------------------------------- the command


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``hf-tuning chat`` (each option also accepts dashes: ``--max-new-tokens``)."""
    parser = commands.add_parser(
        "chat",
        help="chat with a base model, a base + adapter or a merged model in the terminal or from a script",
        description="Chat with a model. Replies go to stdout; prompts, notes and errors to stderr. When stdin "
        "is not a terminal, each input line is one message and no prompts or banners are printed.\n\n" + COMMANDS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def option(name: str, **kwargs: Any) -> None:
        spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        parser.add_argument(*spellings, dest=name, **kwargs)

    option("base", default=None, help="base model: Hub id, folder, .gguf file or package://pkg/file.gguf")
    option("adapter", default=None, help="adapter folder (PEFT LoRA or SNELL/SNELLA); --base defaults to its base")
    option("model", default=None, help="merged model folder (as hf-tuning merge writes it)")
    option(
        "chat_template",
        default=None,
        help="override the saved template: auto, llama3, llama3.1, chatml or a .jinja path "
        "(default: the template saved with the adapter or model)",
    )
    option("system", default=None, help="system prompt")
    option("max_new_tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    option("temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampling")
    option("top_p", type=float, default=None, help="nucleus sampling (needs --temperature > 0)")
    option("top_k", type=int, default=None, help="top-k sampling (needs --temperature > 0)")
    option("seed", type=int, default=None, help="reproducible sampling (needs --temperature > 0)")
    option("repetition_penalty", type=float, default=1.0, help="1.0: none (default)")
    option("dtype", default="auto", choices=DTYPES, help="weights dtype (default: as saved)")
    option("device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    option("trust_remote_code", action="store_true", help="run the model repository's own code (off by default)")
    parser.set_defaults(handler=chat_command)


def chat_command(args: argparse.Namespace) -> int:
    """The command: check the flags, load, then run the loop over standard input."""
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    # Libraries print notices on stdout while loading (DeepSpeed's accelerator line, for one); in a scripted chat
    # stdout must hold the replies alone, so everything printed while loading goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        loaded = load_chat_model(
            base=args.base,
            adapter=args.adapter,
            model=args.model,
            chat_template=args.chat_template,
            max_new_tokens=settings.max_new_tokens,
            dtype=args.dtype,
            device=args.device,
            trust_remote_code=args.trust_remote_code,
        )
    for note in loaded.notes:
        print(note, file=sys.stderr, flush=True)
    session = ChatSession(
        loaded.model,
        loaded.tokenizer,
        settings=settings,
        system_prompt=args.system,
        template=loaded.template,
    )
    interactive = sys.stdin.isatty()
    banner = f"hf-tuning chat: {loaded.description} ({loaded.template or 'saved'} template, {settings.describe()})"
    try:
        return run_chat(session, sys.stdin, sys.stdout, sys.stderr, interactive=interactive, banner=banner)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
