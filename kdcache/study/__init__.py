"""`kdcache study`: several students trained from one cache, each variant over several seeds, compared with intervals.

`run` trains and evaluates every (variant, seed) into runs/<name>/study/<variant>/seed<seed>/ (finished runs are
skipped, interrupted ones resume); `report` turns their results into study.json and study.md (means, standard
deviations, paired differences to the CE-only baseline with 95% confidence intervals); `figure` draws the dev
cross-entropy learning curves and the final metrics.
"""
