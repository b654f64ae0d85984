"""``mdbench report``: a static HTML site of the results for reviewers (:func:`mdbench.report.site.build_site`)."""
