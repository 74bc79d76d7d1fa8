"""PhenoScreen pipeline: plate images to single-cell features, profiles and calls.

One package per stage of the flow, each using only the stages before it:
`pipeline.images` (images in) -> `pipeline.cells` (segmentation, crops) ->
`pipeline.measure` (features) -> `pipeline.profiling` (profiles) -> `pipeline.calls`
(hits, dose response, MoA, QC) -> `pipeline.views` (exports, galleries); `run` and
`cli` sit on top, `config` and `errors` below them all.
"""

__version__ = "0.1.0"
