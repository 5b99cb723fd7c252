"""Classification from scratch by ZO training (DeepZero's headline experiment) and the CGE/RGE/FO study."""
