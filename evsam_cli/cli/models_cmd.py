"""`evsam models`: the zoo with parameters and MACs counted from the model definitions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from .common import command, console


@command
def models_cli(
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the table as JSON to this file.")
    ] = None,
) -> None:
    """List every model: input size, parameters and image-encoder MACs (counted, not looked up).

    Example: [bold]evsam models --json zoo.json[/bold]
    """
    from rich.table import Table

    from ..models import get_spec, list_models
    from ..models.profile import profile_model
    from ..utils.io import write_json_atomic

    table = Table(title="evsam model zoo", caption="paper: EfficientViT-SAM (arXiv 2402.05008), Table 1")
    table.add_column("model")
    table.add_column("alias")
    table.add_column("input", justify="right")
    table.add_column("params (M)", justify="right")
    table.add_column("paper", justify="right", style="dim")
    table.add_column("MACs (G)", justify="right")
    table.add_column("paper", justify="right", style="dim")
    rows: list[dict[str, Any]] = []
    for name in list_models():
        spec = get_spec(name)
        prof = profile_model(name)
        rows.append(
            {
                "model": name,
                "family": spec.family,
                "aliases": list(spec.aliases),
                "input_size": prof.input_size,
                "params": prof.params,
                "encoder_params": prof.encoder_params,
                "encoder_macs": prof.encoder_macs,
                "decoder_macs_per_prompt": prof.decoder_macs_per_prompt,
                "paper_params_m": spec.paper_params_m,
                "paper_macs_g": spec.paper_macs_g,
                "checkpoint_file": spec.filename,
                "checkpoint_url": spec.url,
                "checkpoint_source": spec.source or spec.url,
                "licence": spec.licence,
            }
        )
        table.add_row(
            name,
            spec.aliases[0] if spec.aliases else "",
            str(prof.input_size),
            f"{prof.params / 1e6:.1f}",
            "-" if spec.paper_params_m is None else f"{spec.paper_params_m:.1f}",
            f"{prof.encoder_macs / 1e9:.1f}",
            "-" if spec.paper_macs_g is None else f"{spec.paper_macs_g:.0f}",
        )
    console.print(table)
    console.print(
        "MACs: image encoder at its input size (the decoder adds "
        f"{rows[0]['decoder_macs_per_prompt'] / 1e9:.2f} G per prompt). "
        "Official weights: [bold]create_model(name, checkpoint='hub')[/bold]; file names and URLs in --json."
    )
    if json_out is not None:
        write_json_atomic(json_out, {"models": rows})
