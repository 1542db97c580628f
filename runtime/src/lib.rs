//! prunec runtime: data sets, models, masked training, evaluation and model I/O on candle.

pub mod llm;
