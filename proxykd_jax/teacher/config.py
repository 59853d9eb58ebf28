"""Defaults of the `collect` and `serve` config groups (teacher access over HTTP)."""

import ml_collections

# the request fields a response's length limit may be sent as (`collect.token_limit`): reasoning models take the second
TOKEN_LIMITS = ("max_tokens", "max_completion_tokens")


def collect_config() -> ml_collections.ConfigDict:
    """Defaults of the `collect` group: prompts + OpenAI-compatible endpoint -> teacher corpus."""
    c = ml_collections.ConfigDict()
    c.prompts = ""  # prompts JSONL: one {"id"?, "prompt": str} or {"id"?, "messages": [...]} per line
    c.out = ""  # teacher corpus JSONL to append to (resumable); failures go to <out>.failures.jsonl
    c.base_url = "http://127.0.0.1:8000/v1"  # OpenAI-compatible endpoint, up to and including /v1
    c.model = ""  # model name sent to the endpoint (part of every request's content key)
    c.api = "chat"  # "chat" (/v1/chat/completions) or "completions" (/v1/completions)
    c.api_key = ""  # API key; empty reads the environment variable named by api_key_env
    c.api_key_env = "OPENAI_API_KEY"  # environment variable holding the key (never logged or stored)
    c.samples_per_prompt = 1  # responses requested per prompt (one request each, sample_index 0..n-1)
    c.temperature = 1.0  # sampling temperature sent with each request
    c.top_p = 1.0  # nucleus sampling threshold sent with each request
    c.max_tokens = 256  # maximum tokens per response (with max_completion_tokens: hidden reasoning included)
    c.token_limit = "max_tokens"  # request field max_tokens is sent as: "max_completion_tokens" for reasoning models
    c.send_sampling = True  # send temperature and top_p; False leaves both out (reasoning models that refuse them)
    c.stop = ()  # stop strings sent with each request (at most 4 for OpenAI)
    c.top_logprobs = 0  # 0-20 alternatives per token asked for (a run whose first answers lack them stops); 0 = off
    c.send_seed = (
        True  # send each sample's own `seed` (from its content key): exact with `serve`, best effort elsewhere
    )
    c.concurrency = 8  # requests in flight at once
    c.requests_per_minute = 0  # request rate limit; 0 = unlimited
    c.tokens_per_minute = 0  # token rate limit (prompt estimate + max_tokens reserved); 0 = unlimited
    c.request_timeout_s = 120.0  # per-request timeout; a timeout is retried
    c.max_attempts = 8  # attempts per request for retryable errors (429, 5xx, timeouts, drops, malformed bodies)
    c.breaker_failures = 9  # stop after this many probes in a row get no answer (9: about 2 min, a server restart)
    c.breaker_no_success_s = 60.0  # stop when attempts keep failing and no sample has finished for this long
    c.backoff_initial_s = 0.5  # first backoff; doubles per attempt with full jitter
    c.backoff_max_s = 60.0  # backoff ceiling (a longer Retry-After is still honoured)
    c.price_input_per_mtok = 0.0  # price per million prompt tokens for the cost summary; 0 = no cost line
    c.price_output_per_mtok = 0.0  # price per million completion tokens for the cost summary
    c.max_cost = 0.0  # spend cap (prices' currency): stops before a request could pass it; raise it to go on; 0 = none
    c.progress = True  # show a progress bar (a line every 30 s when stderr is not a terminal)
    c.seed = 0  # seed of the backoff jitter
    return c


def faults_config() -> ml_collections.ConfigDict:
    """Defaults of `serve.faults`: injected failures, all off unless set explicitly (tests only)."""
    f = ml_collections.ConfigDict()
    f.fail_429_rate = 0.0  # fraction of completion requests answered 429 with Retry-After
    f.retry_after_s = 1.0  # Retry-After sent with injected 429s (seconds, may be fractional)
    f.fail_500_rate = 0.0  # fraction of completion requests answered 500 or 503
    f.slow_rate = 0.0  # fraction of completion requests delayed by slow_delay_s
    f.slow_delay_s = 1.0  # delay of slowed requests
    f.drop_rate = 0.0  # fraction of completion requests whose connection closes mid-response
    f.malformed_rate = 0.0  # fraction answered 200 with an unusable body (bad JSON, a choice without message/text)
    f.seed = 0  # seed of the fault draws
    return f


def serve_config() -> ml_collections.ConfigDict:
    """Defaults of the `serve` group: an OpenAI-compatible server for a project checkpoint."""
    c = ml_collections.ConfigDict()
    c.host = "127.0.0.1"  # bind address; loopback unless set explicitly
    c.port = 8000  # TCP port
    c.source = "hf"  # "hf" (Hugging Face folder from models/hf.py) or "known" (KnownTeacher folder)
    c.path = ""  # folder of the checkpoint to serve
    c.model_name = ""  # name reported by /v1/models and accepted in requests; empty = folder name
    c.dtype = "float32"  # compute dtype of the served model
    c.api_key_env = ""  # environment variable holding the key clients must send; empty = no auth
    c.max_tokens_limit = 1024  # largest max_tokens a request may ask for
    c.batch_window_ms = 5.0  # how long the batcher waits to gather concurrent requests into one call
    c.max_batch = 32  # most sequences (requests x n) generated in one call
    c.max_body_bytes = 2 * 1024 * 1024  # larger request bodies are refused with 413 before they are read
    c.request_log = ""  # JSONL file with one line per completion request (time, X-Request-Key, outcome); "" = off
    c.seed = 0  # sampling seed of the server
    c.faults = faults_config()
    return c


def default_config() -> ml_collections.ConfigDict:
    """Both groups owned by the teacher package: `collect` and `serve`."""
    return ml_collections.ConfigDict({"collect": collect_config(), "serve": serve_config()})
