"""Hard negatives mined by the model itself, between stage 1 and stage 2.

For each stage-2 dataset the merged stage-1 model embeds the queries and a candidate pool
(by default the dataset's own positives); an index retrieves each query's nearest
candidates (``search``); rules drop the likely false negatives (``rules``: the query's own
positive, the same item under another row, the same group, a near duplicate of the
positive, anything scoring above ``percpos`` x the positive: NV-Retriever's TopK-PercPos)
and a few of the survivors are drawn from a rank window. The chosen rows are written as
references (``rzenembed.data.schema.mined_reference``), never as copies of their media.
"""
