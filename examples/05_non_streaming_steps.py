"""5. Non-streaming components: a retriever yields its documents as one chunk, and a chain
that starts with one still streams from the model onward.

Guide section "Non-streaming components".
"""
from minichain import (ChatPromptTemplate, GenericFakeChatModel, InMemoryVectorStore,
                       LexicalEmbeddings, RunnablePassthrough, StrOutputParser)

template = """Answer the question based only on the following context:
{context}

Question: {question}
"""
prompt = ChatPromptTemplate.from_template(template)

vectorstore = InMemoryVectorStore.from_texts(
    ["harrison worked at kensho", "harrison likes spicy food"],
    embedding=LexicalEmbeddings(),
)
retriever = vectorstore.as_retriever()

chunks = [chunk for chunk in retriever.stream("where did harrison work?")]
print(chunks)

model = GenericFakeChatModel(messages=iter([
    "Harrison worked at Kensho. Kensho is a place where ideas come alive."]))
retrieval_chain = (
    {
        "context": retriever.with_config(run_name="Docs"),
        "question": RunnablePassthrough(),
    }
    | prompt
    | model
    | StrOutputParser()
)

for chunk in retrieval_chain.stream(
    "Where did harrison work? Write 3 made up sentences about this place."
):
    print(chunk, end="|", flush=True)
print()
