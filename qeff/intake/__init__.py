"""Model intake: everything between a model name or path and a loaded model — resolving the
source, reading headers and configs without loading weights, the support verdict, the tokenizer,
and the memory preflight that refuses a run before anything loads."""
