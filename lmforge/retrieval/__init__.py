"""Dense, lexical and hybrid retrieval: sentence embeddings, contrastive bi-encoder training,
faiss and BM25 indexes (used by the support assistant and the recommender)."""
