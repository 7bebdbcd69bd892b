"""An app for ``rabbitflow run tests.apps.obs_cli:cli_app`` (the observability CLI tests)."""

from rabbitflow import App, Message

cli_app = App(name="obs-cli")


@cli_app.consumer("cli.work")
async def _cli_work(message: Message) -> None:
    pass
