DROP TABLE review_claims;
DROP TABLE annotations;
DROP TABLE reviews;
