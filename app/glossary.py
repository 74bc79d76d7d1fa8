"""What the dashboard's columns and terms mean: one place for every view's help.

Each definition follows the pipeline it describes (`pipeline.profiling.profiles.well_activity`,
`pipeline.calls.hits.call_hits`, `pipeline.calls.doseresponse.fit_dose_response`,
`pipeline.views.export.plate_qc_table`); `widgets.show_glossary` shows a selection.
"""

from pipeline.calls.hits import MIN_SIMILARITY

#: Meaning of each value of ``ec50_flag`` (`pipeline.calls.doseresponse.FLAGS`).
EC50_FLAGS = {
    "ok": "a monotone fit, EC50 inside the tested doses, 95% CI within 2 decades",
    "flat": "no dose dependence (fit vs a flat line and, with replicates, ANOVA "
    "over doses: p > 0.05)",
    "non_monotone": "activity falls by more than half its range after a peak at "
    "a middle dose (e.g. toxicity at top doses)",
    "ec50_outside_range": "the fitted EC50 lies outside the tested doses",
    "ec50_uncertain": "the EC50's 95% CI spans more than 2 decades",
    "no_fit": "the fit failed",
    "too_few_doses": "fewer than 3 doses or 5 wells with a concentration (always "
    "so in designs without concentrations)",
}

#: Term -> definition (Markdown), in reading order.
GLOSSARY = {
    "activity": "a well's distance from DMSO (root mean square of its "
    "DMSO-normalized features) in robust SDs of its plate's DMSO wells' own "
    "distances: DMSO wells scatter around 0 with spread 1. A compound-dose's "
    "activity is the median of its wells'; `max_activity` is a compound's "
    "highest over its doses.",
    "test": "how a compound-dose was tested against the DMSO wells: **mAP** when "
    "it has at least 3 replicate wells with cells and the mAP permutation test can "
    "reach the FDR level, otherwise **distance**: the Mahalanobis distance of its "
    "wells to the DMSO wells, with a p-value from the DMSO wells' own distances. "
    "A compound's `test` lists its doses' tests (`distance+mAP`: both).",
    "mAP": "mean average precision: how well a compound-dose's replicate wells "
    "retrieve each other ahead of the DMSO wells, ranked by cosine similarity "
    "(1 = every replicate first); `map_p` is its permutation p-value.",
    "q-value": "Benjamini-Hochberg-adjusted p-value. A compound's combines its "
    "doses' p-values (Simes) and is adjusted over compounds: a hit when q < FDR. "
    "A dose's is adjusted within its compound at the level the hits leave "
    "(FDR x hits / compounds): active (`is_active`) when q < FDR. It depends on "
    "the number of hit compounds, so it holds at the run's FDR only: for another "
    "level, call hits again (`phenoscreen hits --fdr`) rather than filtering q.",
    "n_active_doses": "doses of the compound called active; at least 1 for every hit.",
    "EC50": "concentration of half-maximal activity, from a 4-parameter logistic "
    "(Hill) fit of well activity vs log concentration, with its 95% CI "
    "(`ec50_ci_low`, `ec50_ci_high`); blank unless `ec50_flag` is `ok`.",
    "ec50_flag": "; ".join(f"`{flag}`: {text}" for flag, text in EC50_FLAGS.items())
    + ".",
    "Z'": "`1 - 3 (SD_pos + SD_neg) / |mean_pos - mean_neg|` of well activity, "
    "positive controls vs DMSO, per plate; robust Z' uses medians and "
    "1.4826 MAD. > 0.5 excellent, 0 to 0.5 usable for phenotypic screens, < 0 "
    "the controls overlap; blank without two wells of each.",
    "edge effect": "the plate's outer ring of wells vs its inner wells: "
    "`edge_to_inner_cell_count` (ratio of median cell counts, 1 = none) and "
    "`edge_minus_inner_activity` (difference of median activity, 0 = none). "
    "`edge_wells` names the wells compared: negative controls when at least two "
    "sit on the edge and two inside, else all wells but positive controls; or why "
    "the effect is blank.",
    "replicate consistency": "`replicate_correlation`: median Pearson correlation "
    "among a compound-dose's replicate wells (a compound: median over its doses); "
    "`is_replicating`: above the 95th percentile of the same for wells of "
    "different compound-doses (percent replicating: the share that replicate); "
    "`replicate_map`: mAP of its replicates retrieving each other among all "
    "treatment wells.",
    "toxic": "a dose whose median cell count is below the toxicity threshold "
    "times the DMSO wells' median (`cell_count_ratio`); a compound is toxic when "
    "any dose is (`min_cell_count_ratio`: its lowest ratio).",
    "nearest compounds": "the most similar other compounds by cosine similarity "
    "of their consensus profiles (each compound at its most active dose), listed "
    f"only at or above {MIN_SIMILARITY:g}: unrelated profiles reach 0.1-0.3 by "
    "chance.",
}
