"""The registered choices of a model and its runs, one family per module: loop distributions (`loops`),
halting kinds (`halting`), exit rules (`exits`), cache policies (`cache`), initial states and input
injections (`state`), position schemes (`position`) and router kinds (`routing`). Each family is a
`Registry` of small classes; config validation, the CLI and the model all read the tables.
See docs/extending.md."""
