"""Traffic plans on endpoints: weighted and sticky splits, shadows and bandits
(:mod:`app.traffic.spec` declares them, :mod:`app.traffic.choice` picks the variant of a
request, :mod:`app.traffic.bandits` keeps the rewards)."""
