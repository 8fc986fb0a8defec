"""OREPA's kernel algebra: the pure kernel functions (:mod:`.algebra`), the branch registry
(:mod:`.branches`), the squeeze operator (:mod:`.squeeze`) and the optional CPU extension it uses
(:mod:`.extension`)."""
